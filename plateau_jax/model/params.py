"""The canonical param tree: TransformerLens weight names, every block's params stacked on a
leading layer axis (so the forward is one ``lax.scan``), and pure helpers to read or replace
one block.

Shapes (``L`` layers, ``d`` d_model, ``H``/``Hkv`` query/key-value heads, ``k`` d_head, ``m``
d_mlp, ``V`` vocabulary, ``P`` positions); entries in brackets exist only for some configs::

    embed/W_E [V, d]            [pos_embed/W_pos [P, d]]        (learned positions)
    blocks/ln1/w [L, d]         [blocks/ln1/b [L, d]]            (LayerNorm; RMSNorm has no b)
    blocks/attn/W_Q [L, H, d, k]    [b_Q [L, H, k]]
    blocks/attn/W_K [L, Hkv, d, k]  [b_K [L, Hkv, k]]   (W_V, b_V alike)
    blocks/attn/W_O [L, H, k, d]    [b_O [L, d]]
    blocks/ln2/w, [b]
    blocks/mlp/W_in [L, d, m]   [b_in [L, m]]   [W_gate [L, d, m], [b_gate]]   (gated MLPs)
    blocks/mlp/W_out [L, m, d]  [b_out [L, d]]
    ln_final/w [d], [b [d]]
    [unembed/W_U [d, V]]        (untied only; tied models unembed with W_E.T)

Checkpoints keep their HuggingFace names on disk; :mod:`plateau_jax.model.families` translates.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import jax
import jax.numpy as jnp

from plateau_jax.model.config import ModelConfig

Params = Dict[str, Any]


def param_shapes(cfg: ModelConfig) -> Params:
    """The canonical tree with a shape tuple at every leaf (see the module docstring)."""
    L, d, m, V = cfg.n_layer, cfg.d_model, cfg.d_mlp, cfg.vocab_size
    H, Hkv, k = cfg.n_head, cfg.n_kv_head, cfg.d_head
    norm = lambda *lead: {"w": lead + (d,), **({"b": lead + (d,)} if cfg.norm == "layernorm" else {})}
    attn = {"W_Q": (L, H, d, k), "W_K": (L, Hkv, d, k), "W_V": (L, Hkv, d, k), "W_O": (L, H, k, d)}
    if cfg.attn_bias:
        attn.update(b_Q=(L, H, k), b_K=(L, Hkv, k), b_V=(L, Hkv, k))
    if cfg.attn_out_bias:
        attn["b_O"] = (L, d)
    mlp = {"W_in": (L, d, m), "W_out": (L, m, d)}
    if cfg.gated_mlp:
        mlp["W_gate"] = (L, d, m)
    if cfg.mlp_bias:
        mlp.update(b_in=(L, m), b_out=(L, d), **({"b_gate": (L, m)} if cfg.gated_mlp else {}))
    tree = {"embed": {"W_E": (V, d)},
            "blocks": {"ln1": norm(L), "attn": attn, "ln2": norm(L), "mlp": mlp},
            "ln_final": norm()}
    if cfg.positional == "learned":
        tree["pos_embed"] = {"W_pos": (cfg.n_positions, d)}
    if not cfg.tie_embeddings:
        tree["unembed"] = {"W_U": (d, V)}
    return tree


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """GPT-2's initialisation: weights ~ N(0, 0.02), output projections (W_O, W_out) scaled by
    1/sqrt(2 n_layer), norm weights 1, biases 0."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        if name == "w":
            out.append(jnp.ones(shape, dtype))
        elif name.startswith("b"):
            out.append(jnp.zeros(shape, dtype))
        else:
            std = 0.02 / (math.sqrt(2 * cfg.n_layer) if name in ("W_O", "W_out") else 1.0)
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """Shapes and dtypes of the param tree as ``jax.ShapeDtypeStruct`` leaves; nothing allocated."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                                  is_leaf=_is_shape)


def unembedding(params: Params) -> jax.Array:
    """``W_U`` ``[d, V]``: the untied unembedding, or ``W_E.T`` for tied models."""
    return params["unembed"]["W_U"] if "unembed" in params else params["embed"]["W_E"].T


def block_params(params: Params, layer: int) -> Params:
    """Block ``layer``'s params (every leaf without its layer axis)."""
    return jax.tree_util.tree_map(lambda a: a[layer], params["blocks"])


def replace_block(params: Params, layer: int, block: Params) -> Params:
    """A new param tree whose block ``layer`` is ``block`` (e.g. ``block_params(other, 7)``);
    ``params`` is untouched. ``block`` must have a block's structure and shapes."""
    blocks = params["blocks"]
    n_layer = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    if not (isinstance(layer, int) and 0 <= layer < n_layer):
        raise ValueError(f"layer {layer!r} is out of range: blocks are 0..{n_layer - 1}.")
    leaves = jax.tree_util.tree_leaves
    ok = (jax.tree_util.tree_structure(block) == jax.tree_util.tree_structure(blocks)
          and all(tuple(jnp.shape(b)) == a.shape[1:] for a, b in zip(leaves(blocks), leaves(block))))
    if not ok:
        want = jax.tree_util.tree_map(lambda a: a.shape[1:], blocks)
        raise ValueError(
            "replacement block params do not match a block of this model: expected "
            f"{_describe(want)}; got {_describe(jax.tree_util.tree_map(jnp.shape, block))}. "
            "Take them from block_params(params, layer) of a model with the same config.")
    new = jax.tree_util.tree_map(lambda a, b: a.at[layer].set(jnp.asarray(b, a.dtype)), blocks, block)
    return {**params, "blocks": new}


def _describe(tree) -> str:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_shape)[0]
    return ", ".join(f"{'/'.join(p.key for p in path)} {tuple(s)}" for path, s in flat)
