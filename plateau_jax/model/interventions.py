"""Building interventions: frozen components, replaced blocks, linearised MLPs.

All of these return new values (patch dicts, param trees, functions); nothing is mutated.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

from plateau_jax.model.config import GPT2Config
from plateau_jax.model.modules import MLP, Hooks
from plateau_jax.model.sites import check_layer

COMPONENTS = ("attn", "mlp")


def freeze(component: str, values: Mapping[int, jax.Array], config: GPT2Config):
    """Patches that hold ``blocks.{i}.hook_{component}_out`` at the last position to given values.

    Args:
      component: "attn" or "mlp".
      values: ``{layer: value}``, each ``[d]`` (same for every row) or ``[batch, d]``.

    Returns:
      a patch dict for :func:`forward` / :func:`continue_from`.
    """
    if component not in COMPONENTS:
        raise ValueError(f"freeze component {component!r}: expected one of {COMPONENTS}.")
    return {f"blocks.{check_layer(int(i), config)}.hook_{component}_out": v
            for i, v in values.items()}


def replace_block(params, layer: int, block_params):
    """A new param tree whose block ``layer`` has ``block_params`` (e.g. another model's
    ``params["h"]["7"]``); the input tree is untouched."""
    if str(layer) not in params["h"]:
        raise ValueError(f"layer {layer} is out of range: blocks are 0..{len(params['h']) - 1}.")
    old, new = params["h"][str(layer)], block_params
    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(old),
                                               jax.tree_util.tree_leaves(new))):
        raise ValueError("replacement block params do not match the block's structure and shapes.")
    return {**params, "h": {**params["h"], str(layer): new}}


def linearized_mlp(params, config: GPT2Config, layer: int, at: jax.Array):
    """``fn(ln2_normalized) -> mlp_out``: the MLP of ``layer`` linearised around input ``at`` [d].

    Use as ``swaps={f"blocks.{layer}.mlp": fn}``; exact at ``at``, affine elsewhere.
    """
    check_layer(layer, config)
    p = params["h"][str(layer)]["mlp"]
    mlp = lambda h: MLP(config).apply({"params": p}, h, Hooks(), "")
    at = jnp.asarray(at)
    y0, jvp_fn = jax.linearize(mlp, at)

    def fn(h):
        flat = h.reshape(-1, h.shape[-1])
        out = jax.vmap(jvp_fn)(flat - at) + y0
        return out.reshape(h.shape[:-1] + (y0.shape[-1],))

    return fn
