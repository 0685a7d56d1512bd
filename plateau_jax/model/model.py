"""The model object users hold: params + config + tokenizer + matmul precision."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import params as params_lib
from plateau_jax.model.config import ModelConfig
from plateau_jax.model.core import check_precision

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
class Model:
    """A transformer: a pytree whose only leaves are ``params`` (everything else is static).

    Attributes:
      params: the canonical, layer-stacked param tree (:mod:`plateau_jax.model.params`).
      config: :class:`~plateau_jax.model.config.ModelConfig`.
      tokenizer: a transformers tokenizer, or None.
      name: where the weights came from (hub id or directory), for provenance.
      matmul_precision: precision of every matrix product: "highest" (default: exact float32 on
        every backend) or a faster setting by name (see :data:`plateau_jax.model.core.MATMUL_PRECISIONS`).
    """

    params: Any
    config: ModelConfig = flax.struct.field(pytree_node=False)
    tokenizer: Any = flax.struct.field(pytree_node=False, default=None)
    name: str = flax.struct.field(pytree_node=False, default="")
    matmul_precision: str = flax.struct.field(pytree_node=False, default="highest")

    @property
    def dtype(self):
        return self.params["embed"]["W_E"].dtype

    def astype(self, dtype) -> "Model":
        """A copy with every param cast to ``dtype`` ("float32", "bfloat16", "float16")."""
        dt = resolve_dtype(dtype)
        return self.replace(params=jax.tree_util.tree_map(lambda a: a.astype(dt), self.params))

    def with_precision(self, matmul_precision: str) -> "Model":
        """A copy whose matrix products use ``matmul_precision`` (same params)."""
        return self.replace(matmul_precision=check_precision(matmul_precision))

    def block(self, layer: int):
        """Block ``layer``'s params (leaves without the layer axis)."""
        return params_lib.block_params(self.params, layer)

    def with_block(self, layer: int, block) -> "Model":
        """A copy whose block ``layer`` has ``block``'s params (e.g. ``other.block(7)``)."""
        return self.replace(params=params_lib.replace_block(self.params, layer, block))

    def to_tokens(self, text: str) -> np.ndarray:
        """Token ids [T] of ``text`` (no BOS token is added, as in the study)."""
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer; pass token ids instead of text.")
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


# The name the first release used.
GPT2 = Model


def init_model(config: ModelConfig, seed: int = 0, dtype="float32", tokenizer=None,
               matmul_precision: str = "highest") -> Model:
    """A randomly initialised model (GPT-2's init, :func:`plateau_jax.model.params.init_params`)."""
    dt = resolve_dtype(dtype)
    init = jax.jit(params_lib.init_params, static_argnums=(0, 2))
    return Model(params=init(config, jax.random.PRNGKey(seed), dt), config=config,
                 tokenizer=tokenizer, name=f"random-init(seed={seed})",
                 matmul_precision=check_precision(matmul_precision))
