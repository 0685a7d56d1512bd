"""The model object users hold: params + config + tokenizer, and random initialisation."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model.config import GPT2Config
from plateau_jax.model.modules import GPT2LMHead

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
    """Maps "float32"/"bfloat16"/"float16" (or the jnp types) to a jnp dtype; refuses others."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
        return DTYPES[dtype]
    for v in DTYPES.values():
        if np.dtype(dtype) == np.dtype(v):
            return v
    raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}.")


@flax.struct.dataclass
class GPT2:
    """A GPT-2 model: a pytree whose only leaves are ``params`` (config and tokenizer are static).

    Attributes:
      params: HF-named param tree (see :mod:`plateau_jax.modules`).
      config: :class:`GPT2Config`.
      tokenizer: a transformers tokenizer, or None.
      name: where the weights came from (hub id or directory), for provenance.
    """

    params: Any
    config: GPT2Config = flax.struct.field(pytree_node=False)
    tokenizer: Any = flax.struct.field(pytree_node=False, default=None)
    name: str = flax.struct.field(pytree_node=False, default="")

    @property
    def module(self) -> GPT2LMHead:
        return GPT2LMHead(self.config)

    @property
    def dtype(self):
        return self.params["wte"]["weight"].dtype

    def astype(self, dtype) -> "GPT2":
        """A copy with every param cast to ``dtype`` ("float32", "bfloat16", "float16")."""
        dt = resolve_dtype(dtype)
        return self.replace(params=jax.tree_util.tree_map(lambda a: a.astype(dt), self.params))

    def to_tokens(self, text: str) -> np.ndarray:
        """Token ids [T] of ``text`` (no BOS token is added, as in the study)."""
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer; pass token ids instead of text.")
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def abstract_params(config: GPT2Config):
    """Shapes and dtypes of the param tree, without allocating (``jax.eval_shape`` of init)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda i: GPT2LMHead(config).init(jax.random.PRNGKey(0), i), ids)["params"]


def init_model(config: GPT2Config, seed: int = 0, dtype="float32", tokenizer=None) -> GPT2:
    """A randomly initialised model (GPT-2's init: normal(0.02), residual projections scaled)."""
    init = jax.jit(GPT2LMHead(config).init)
    params = init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))
    return GPT2(params=params["params"], config=config, tokenizer=tokenizer,
                name=f"random-init(seed={seed})").astype(dtype)
