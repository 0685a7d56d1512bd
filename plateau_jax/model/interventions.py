"""Building interventions: frozen sublayer outputs, replaced blocks, linearised MLPs.

All of these return new values (patch dicts, param trees, functions); nothing is mutated.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from plateau_jax.model import layers
from plateau_jax.model.config import ModelConfig
from plateau_jax.model.params import block_params, replace_block  # noqa: F401 (re-exported)
from plateau_jax.model.sites import SUBLAYERS, check_layer, site_name


def check_sublayer(sublayer: str) -> str:
    """``sublayer`` if it is one of :data:`~plateau_jax.model.sites.SUBLAYERS` ("attn", "mlp")."""
    if sublayer not in SUBLAYERS:
        raise ValueError(f"freeze sublayer {sublayer!r}: expected one of {SUBLAYERS} (its "
                         "hook_attn_out or hook_mlp_out is held).")
    return sublayer


def freeze(sublayer: str, values: Mapping[int, jax.Array], config: ModelConfig):
    """Patches that hold ``blocks.{i}.hook_{sublayer}_out`` at given values.

    Args:
      sublayer: "attn" or "mlp".
      values: ``{layer: value}``, each ``[d]`` (same for every row) or ``[batch, d]``.

    Returns:
      a patch dict for :func:`plateau_jax.forward` (last position) or
      :func:`plateau_jax.continue_from` (every row).
    """
    check_sublayer(sublayer)
    return {site_name(check_layer(int(i), config), f"{sublayer}_out"): v
            for i, v in values.items()}


def linearized_mlp(params, config: ModelConfig, layer: int, at: jax.Array):
    """``fn(ln2_normalized) -> mlp_out``: the MLP of ``layer`` linearised around input ``at`` [d].

    Use as ``swaps={f"blocks.{layer}.mlp": fn}``; exact at ``at``, affine elsewhere.
    """
    check_layer(layer, config)
    p = block_params(params, layer)["mlp"]
    at = jnp.asarray(at)
    y0, jvp_fn = jax.linearize(lambda h: layers.mlp(p, h, config), at)

    def fn(h):
        flat = h.reshape(-1, h.shape[-1])
        out = jax.vmap(jvp_fn)(flat - at) + y0
        return out.reshape(h.shape[:-1] + (y0.shape[-1],))

    return fn
