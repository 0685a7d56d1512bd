"""The one functional core: every forward pass of the package runs through :func:`run_blocks`.

All blocks run under one ``lax.scan`` over the layer-stacked params, so a program's size and its
compile time do not grow with depth. Where the computation enters (``entry``, a half-block index
from :func:`plateau_jax.model.sites.entry_index`) is a runtime value: blocks before it are
skipped with ``lax.cond``, so one compiled continuation serves every layer and residual site.

Interventions are explicit arguments (:class:`Interventions`), never state:

* record: ``rec_slots[local]`` ``[L]`` int32 gives each layer's row in an output buffer of
  ``K`` rows (``-1``: not recorded); the result is ``[K, *site_shape]``. Which layers is a
  runtime value; ``K`` and the local names are static.
* patch: :class:`Patch` per local site: per-layer values ``[K, ...]`` selected by
  ``slots`` ``[L]`` (``-1``: not patched) and an optional boolean ``where`` (e.g. the last
  position only), both broadcast against the site's value.
* swap: ``(layer, "block" | "mlp", fn)`` replaces a block (``resid_pre -> resid_post``) or an
  MLP (``ln2_normalized -> mlp_out``) by a function; each distinct function is a new program.

Everything here is pure and composes with ``jit``, ``vmap``, ``jacfwd`` and ``grad``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import layers
from plateau_jax.model.config import ModelConfig
from plateau_jax.model.params import unembedding
from plateau_jax.model.sites import HALF, site_index, site_shape

Array = jax.Array

# "highest"/"float32": exact float32 products on every backend (the default). Faster, by name:
# "tensorfloat32" (TF32 tensor cores), "high" (TF32 on GPUs, 3 bf16 passes on TPUs),
# "bfloat16" (one bf16 pass), "default" (the backend's fastest: TF32 on recent NVIDIA GPUs).
MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16", "default")


@flax.struct.dataclass
class KVCache:
    """Keys and values of shared contexts, computed once by :func:`prefix`.

    ``keys``/``values`` ``[L, B, Hkv, T, k]``, ``mask`` ``[B, T]`` (False for right padding),
    ``length`` ``[B]`` int32 (real positions; the next token sits at position ``length``).
    """

    keys: Array
    values: Array
    mask: Array
    length: Array

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def layer(self, i) -> layers.Context:
        """One layer's context for :func:`plateau_jax.model.layers.attention`."""
        return layers.Context(self.keys[i], self.values[i], self.mask)


@flax.struct.dataclass
class Patch:
    """Replacement values for one site: ``values`` ``[K, ...]`` (per-layer rows selected by
    ``slots`` ``[L]``, -1 = not patched; global sites: ``values`` alone), broadcast to the
    site's value where ``where`` (bool ``[K, ...]`` rows like ``values``, broadcastable; None =
    everywhere) is True."""

    values: Array
    slots: Optional[Array] = None
    where: Optional[Array] = None


@flax.struct.dataclass
class Interventions:
    """What a call records, patches and swaps (see the module docstring)."""

    rec_slots: Dict[str, Array] = flax.struct.field(default_factory=dict)
    rec_sizes: Tuple[Tuple[str, int], ...] = flax.struct.field(pytree_node=False, default=())
    rec_global: Tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    patches: Dict[str, Patch] = flax.struct.field(default_factory=dict)
    swaps: Tuple[Tuple[int, str, Callable], ...] = flax.struct.field(pytree_node=False,
                                                                    default=())


NONE = Interventions()


def record_layers(layers_by_site: Dict[str, Sequence[int]], n_layer: int) -> Interventions:
    """Interventions recording ``{local: layers}`` (rows in the given order)."""
    slots, sizes = {}, []
    for local, ls in sorted(layers_by_site.items()):
        s = np.full(n_layer, -1, np.int32)
        s[list(ls)] = np.arange(len(ls), dtype=np.int32)
        slots[local] = s
        sizes.append((local, len(ls)))
    return Interventions(rec_slots=slots, rec_sizes=tuple(sizes))


def layer_patch(values, layers_patched: Sequence[int], n_layer: int, where=None) -> Patch:
    """A :class:`Patch` putting row ``j`` of ``values`` into layer ``layers_patched[j]``."""
    s = np.full(n_layer, -1, np.int32)
    s[list(layers_patched)] = np.arange(len(layers_patched), dtype=np.int32)
    return Patch(values=values, slots=s, where=where)


# ----------------------------------------------------------------------------- hooks

def _patch(value: Array, patch: Patch, slot) -> Array:
    where = patch.where
    if slot is None:
        new, mask = patch.values, True
    else:
        row = jnp.maximum(slot, 0)
        new = jax.lax.dynamic_index_in_dim(patch.values, row, 0, keepdims=False)
        mask = slot >= 0
        if where is not None:
            where = jax.lax.dynamic_index_in_dim(where, row, 0, keepdims=False)
    if where is not None:
        mask = jnp.logical_and(mask, where)
    return jnp.where(mask, jnp.broadcast_to(new.astype(value.dtype), value.shape), value)


class _Hook:
    """Applies layer ``i``'s patches and keeps its records (global sites when ``i`` is None)."""

    def __init__(self, iv: Interventions, i=None):
        self.iv, self.i, self.recs = iv, i, {}

    def __call__(self, name: str, value: Array) -> Array:
        patch = self.iv.patches.get(name)
        if patch is not None:
            slot = None if self.i is None else jnp.asarray(patch.slots)[self.i]
            value = _patch(value, patch, slot)
        if name in (self.iv.rec_global if self.i is None else self.iv.rec_slots):
            self.recs[name] = value
        return value

    def child(self) -> "_Hook":
        return _Hook(self.iv, self.i)


def _switch(index, fns, operand, hook: _Hook, names, zeros):
    """``fns[index](operand, hook)`` under ``lax.switch`` (``index`` None: ``fns[0]`` inline).
    Records made inside (among ``names``) are merged into ``hook``; a branch that does not make
    one returns zeros for it."""
    if index is None:
        return fns[0](operand, hook)

    def wrap(fn):
        def branch(op):
            h = hook.child()
            out = fn(op, h)
            return out, {n: h.recs[n] if n in h.recs else zeros(n) for n in names}
        return branch

    out, recs = jax.lax.switch(index, [wrap(f) for f in fns], operand)
    hook.recs.update(recs)
    return out


# ----------------------------------------------------------------------------- the scan

def run_blocks(params, cfg: ModelConfig, x: Array, *, positions: Array,
               context: Optional[KVCache] = None, entry: Optional[Array] = None,
               iv: Interventions = NONE, collect_kv: bool = False):
    """Runs every block on residual input ``x`` ``[B, S, d]``.

    Args:
      positions: ``[B, S]`` int positions (rotary embeddings).
      context: None: the S positions are one causal sequence (full forward, prefix). Else each
        of the S rows is an independent next token attending to the cached context.
      entry: runtime half-block index where ``x`` enters (None: before block 0, no skipping).
      iv: interventions.
      collect_kv: also return every layer's keys/values ``[L, B, Hkv, S, k]`` (sequences only).

    Returns:
      ``(x, records {local: [K, ...]}, (keys, values) or None)``.
    """
    L = cfg.n_layer
    B, S = x.shape[:2]
    n_keys = S if context is None else context.keys.shape[3] + 1
    shape = lambda n: site_shape(n, cfg, B, S, n_keys)
    zeros = lambda n: jnp.zeros(shape(n), x.dtype)
    kv_zeros = lambda: (jnp.zeros((B, cfg.n_kv_head, S, cfg.d_head), x.dtype),) * 2
    recorded = [n for n, _ in iv.rec_sizes]
    inside = lambda halves: [n for n in recorded if HALF[n] in halves]
    mlp_inner = [n for n in recorded if n.startswith("mlp.")]
    block_swaps = {l: fn for l, kind, fn in iv.swaps if kind == "block"}
    mlp_swaps = {l: fn for l, kind, fn in iv.swaps if kind == "mlp"}

    def table(swaps):
        t = np.zeros(L, np.int32)
        for j, l in enumerate(sorted(swaps)):
            t[l] = j + 1
        return jnp.asarray(t)

    block_table, mlp_table = table(block_swaps), table(mlp_swaps)

    def body(bufs, xs):
        i, bp = xs["i"], xs["bp"]
        ctx = None if context is None else layers.Context(xs["keys"], xs["values"], context.mask)
        hook = _Hook(iv, i)

        def half(offset, fn, y, hk, names):
            """``fn`` if this half-block runs (index >= entry), else pass ``y`` through."""
            if entry is None:
                return fn(y, hk)
            runs = (2 * i + offset >= entry).astype(jnp.int32)
            return _switch(runs, [lambda y, h: (y, None), fn], y, hk, names, zeros)

        def mlp_fn(h_norm, hook):
            if not mlp_swaps:
                return None
            fns = [lambda h, hk: layers.mlp(bp["mlp"], h, cfg, hk)] + [
                (lambda h, hk, f=f: f(h)) for _, f in sorted(mlp_swaps.items())]
            return _switch(mlp_table[i], fns, h_norm, hook, mlp_inner, zeros)

        def attn_half(y, hk):
            a, kv = layers.attn_part(bp, y, cfg, positions=positions, context=ctx, hook=hk)
            return y + a, kv

        def mlp_half(y, hk):
            sub = (lambda h: mlp_fn(h, hk)) if mlp_swaps else None
            return y + layers.mlp_part(bp, y, cfg, hk, mlp_fn=sub), None

        def parallel(y, hk):
            a, kv = layers.attn_part(bp, y, cfg, positions=positions, context=ctx, hook=hk)
            sub = (lambda h: mlp_fn(h, hk)) if mlp_swaps else None
            return y + a + layers.mlp_part(bp, y, cfg, hk, mlp_fn=sub), kv

        def normal(y, hk):
            if cfg.parallel_residual:
                return half(0, parallel, y, hk, inside(("attn", "mlp")))
            y, kv = half(0, attn_half, y, hk, inside(("attn",)))
            y = hk("hook_resid_mid", y)
            y, _ = half(1, mlp_half, y, hk, inside(("mlp",)))
            return y, kv

        def with_kv(fn):
            def g(y, hk):
                out, kv = fn(y, hk)
                return out, (kv if kv is not None else kv_zeros()) if collect_kv else None
            return g

        y = hook("hook_resid_pre", bufs["_x"])
        fns = [with_kv(normal)] + [with_kv(lambda y, hk, f=f: (f(y), None))
                                   for _, f in sorted(block_swaps.items())]
        names = inside(("attn", "mlp")) + (["hook_resid_mid"] if "hook_resid_mid" in recorded else [])
        y, kv = _switch(block_table[i] if block_swaps else None, fns, y, hook, names, zeros)
        y = hook("hook_resid_post", y)
        out = {"_x": y}
        for n in recorded:
            slot = jnp.asarray(iv.rec_slots[n])[i]
            buf = bufs[n]
            row = jnp.where(slot >= 0, slot, buf.shape[0] - 1)
            out[n] = jax.lax.dynamic_update_index_in_dim(buf, hook.recs[n].astype(buf.dtype), row, 0)
        return out, kv

    bufs = {n: jnp.zeros((k + 1,) + shape(n), x.dtype) for n, k in iv.rec_sizes}
    bufs["_x"] = x
    xs = {"i": jnp.arange(L), "bp": params["blocks"]}
    if context is not None:
        xs["keys"], xs["values"] = context.keys, context.values
    bufs, kv = jax.lax.scan(body, bufs, xs)
    x = bufs.pop("_x")
    return x, {n: b[:-1] for n, b in bufs.items()}, kv


# ----------------------------------------------------------------------------- whole passes

def embed(params, cfg: ModelConfig, ids: Array, positions: Array, hook=layers.no_hook) -> Array:
    """Residual stream input ``[B, T, d]`` of token ids ``[B, T]`` at ``positions`` ``[B, T]``."""
    x = hook("hook_embed", jnp.take(params["embed"]["W_E"], ids, axis=0))
    if cfg.positional == "learned":
        x = x + hook("hook_pos_embed", jnp.take(params["pos_embed"]["W_pos"], positions, axis=0))
    return x


def unembed(params, cfg: ModelConfig, x: Array, hook=layers.no_hook) -> Array:
    """Logits ``[..., V]`` of final residuals ``x`` ``[..., d]`` (final norm included)."""
    h = hook("ln_final.hook_normalized", layers.norm(params["ln_final"], x, cfg))
    return h @ unembedding(params).astype(h.dtype)


def forward(params, cfg: ModelConfig, ids: Array, iv: Interventions = NONE,
            collect_kv: bool = False):
    """Full forward of token ids ``[B, T]``: ``(logits [B, T, V], records, kv or None)`` with
    ``records = {**{local: [K, B, T, ...]}, **{global site: value}}``."""
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ghook = _Hook(iv)
    x = embed(params, cfg, ids, positions, ghook)
    x, recs, kv = run_blocks(params, cfg, x, positions=positions, iv=iv, collect_kv=collect_kv)
    logits = unembed(params, cfg, x, ghook)
    return logits, {**recs, **ghook.recs}, kv


def prefix(params, cfg: ModelConfig, ids: Array, lengths: Array,
           iv: Interventions = NONE) -> KVCache:
    """Runs right-padded contexts ``[B, T]`` once; keeps every layer's keys and values (zeros
    for blocks swapped for functions, which have none)."""
    _, _, (keys, values) = forward(params, cfg, ids, iv, collect_kv=True)
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    return KVCache(keys, values, mask, lengths.astype(jnp.int32))


def embed_next(params, cfg: ModelConfig, cache: KVCache, token_ids: Array) -> Array:
    """``blocks.0.hook_resid_pre`` ``[B, N, d]`` of tokens ``[B, N]`` placed right after each
    context of ``cache`` (position ``cache.length``)."""
    positions = jnp.broadcast_to(cache.length[:, None], token_ids.shape)
    return embed(params, cfg, token_ids, positions)


def continue_from(params, cfg: ModelConfig, cache: KVCache, x: Array, entry: Array,
                  iv: Interventions = NONE):
    """Runs ``x`` ``[B, N, d]`` (N independent next-token rows per context, each the value of the
    entry site) from half-block ``entry`` to the logits. Returns ``(logits [B, N, V], records)``;
    recorded rows of sites upstream of the entry are NaN."""
    positions = jnp.broadcast_to(cache.length[:, None], x.shape[:2])
    ghook = _Hook(iv)
    x, recs, _ = run_blocks(params, cfg, x, positions=positions, context=cache, entry=entry, iv=iv)
    logits = unembed(params, cfg, x, ghook)
    for name, k in iv.rec_sizes:  # rows of sites upstream of the entry were never computed
        layer = jnp.argmax(jnp.asarray(iv.rec_slots[name])[None, :] == jnp.arange(k)[:, None], axis=1)
        computed = 2 * layer + _half_offset(name, cfg) >= entry
        recs[name] = jnp.where(computed.reshape((k,) + (1,) * (recs[name].ndim - 1)),
                               recs[name], jnp.nan)
    return logits, {**recs, **ghook.recs}


def _half_offset(local: str, cfg: ModelConfig) -> int:
    """``site_index(layer, local) - 2 layer`` (see :func:`plateau_jax.model.sites.site_index`)."""
    return site_index(0, local, cfg)


def check_precision(name: str) -> str:
    """Validates a ``matmul_precision`` name (see :data:`MATMUL_PRECISIONS`)."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision={name!r} is not one of {MATMUL_PRECISIONS}. 'highest' (the default) "
            "is exact float32 on every backend; 'high', 'tensorfloat32', 'bfloat16' or 'default' "
            "trade accuracy for speed on GPUs/TPUs (see docs/numerics.md).")
    return name
