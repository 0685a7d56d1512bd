"""The training objective, computed by the same functional core as every other forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from plateau_jax.model import core
from plateau_jax.model.config import ModelConfig


def next_token_loss(params, config: ModelConfig, batch: jax.Array,
                    precision: str = "highest") -> jax.Array:
    """Mean next-token cross-entropy (nats) of token windows ``batch`` ``[B, T + 1]``: inputs
    ``batch[:, :-1]``, targets ``batch[:, 1:]``."""
    with jax.default_matmul_precision(precision):
        logits, _, _ = core.forward(params, config, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[:, 1:]).mean()
