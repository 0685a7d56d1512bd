"""The public forward passes, with validation: full forward, prefix cache, continuation.

Every function here validates its inputs, translates TransformerLens site names into the core's
stacked interventions, and calls one jitted program of :mod:`plateau_jax.model.core` (one per
model shape, site set and patch set: not per layer). Interventions are explicit arguments:

* ``sites``: full site names to record (e.g. ``blocks.3.hook_resid_post``).
* ``patches``: ``{site: value}``. In :func:`forward`, a value with the site's full rank
  (``[batch, T, ...]``) replaces every position and one rank lower (``[batch, ...]``, or
  broadcastable to it) the last position only. In :func:`continue_from`, values are per row
  (``[N, ...]``) or broadcast. Freezing a component is such a patch (:func:`plateau_jax.freeze`).
* ``swaps``: ``{"blocks.{i}": fn}`` replaces a block by ``fn(resid_pre) -> resid_post``
  (position-wise, e.g. :func:`identity_block`); ``{"blocks.{i}.mlp": fn}`` an MLP by
  ``fn(ln2_normalized) -> mlp_out``. Each distinct function compiles its own program. To run a
  block with other params use :meth:`Model.with_block` (same program).

Nothing mutates the model; every function composes with ``jit``, ``vmap`` and ``jacfwd``.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import core
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.config import ModelConfig
from plateau_jax.model.core import KVCache
from plateau_jax.model.model import Model

Array = jax.Array
_SWAP_RE = re.compile(r"^blocks\.(\d+)(\.mlp)?$")
_IN_SWAPPED_MLP = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")


def identity_block(x):
    """A block swap that passes the residual stream through unchanged."""
    return x


# ----------------------------------------------------------------------------- jitted programs

def _select(records, layout, squeeze: bool):
    """``{name: value}`` from the core's stacked records, by a static ``layout`` of
    ``(name, local, row (-1: a global site), pattern rows first)``."""
    out = {}
    for name, local, row, rows_first in layout:
        value = records[local] if row < 0 else records[local][row]
        if rows_first:
            value = jnp.swapaxes(value, 1, 2)
        out[name] = value[0] if squeeze else value
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "precision", "layout"))
def _forward_jit(params, ids, iv, cfg, precision, layout):
    with jax.default_matmul_precision(precision):
        logits, records, _ = core.forward(params, cfg, ids, iv)
    return logits, _select(records, layout, False)


@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def _prefix_jit(params, ids, lengths, iv, cfg, precision):
    with jax.default_matmul_precision(precision):
        return core.prefix(params, cfg, ids, lengths, iv)


@functools.partial(jax.jit, static_argnames=("cfg", "precision", "layout", "squeeze"))
def _continue_jit(params, cache, x, entry, iv, cfg, precision, layout=None, squeeze=False):
    """One program for every entry point (``entry`` is traced). ``layout`` None: stacked records."""
    with jax.default_matmul_precision(precision):
        logits, records = core.continue_from(params, cfg, cache, x, entry, iv)
    if layout is None:
        return logits, records
    return (logits[0] if squeeze else logits), _select(records, layout, squeeze)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed_next_jit(params, cache, ids, cfg):
    return core.embed_next(params, cfg, cache, ids)


# ----------------------------------------------------------------------------- validation

def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _xp(*xs):
    """numpy for concrete values (no eager XLA programs), jax.numpy under tracing."""
    return np if _concrete(*xs) else jnp


def as_ids(tokens, config: ModelConfig) -> Tuple[Array, bool]:
    """``(ids [batch, T] int32, was_1d)``; checks rank, range and length when values are known."""
    if _concrete(tokens):
        arr = np.asarray(tokens)
        if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
            raise ValueError(f"token ids must have shape [T] or [batch, T] with T >= 1; got {arr.shape}.")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers; got dtype {arr.dtype}.")
        bad = arr[(arr < 0) | (arr >= config.vocab_size)]
        if bad.size:
            raise ValueError(
                f"token ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary "
                f"[0, {config.vocab_size}); tokenize with this model's tokenizer.")
        ids = arr.astype(np.int32)
    else:
        ids = tokens
    if ids.shape[-1] > config.n_positions:
        raise ValueError(f"sequence length {ids.shape[-1]} exceeds n_positions={config.n_positions}; "
                         "shorten the input.")
    was_1d = ids.ndim == 1
    return (ids[None] if was_1d else ids), was_1d


def _swaps(swaps, config: ModelConfig) -> Tuple[Tuple[int, str, Callable], ...]:
    out = []
    for key, fn in dict(swaps or {}).items():
        m = _SWAP_RE.match(key)
        if not m:
            raise ValueError(f"swap key {key!r}: expected 'blocks.{{i}}' or 'blocks.{{i}}.mlp'.")
        layer = sites_lib.check_layer(int(m.group(1)), config, what=f"swap {key!r} layer")
        if not callable(fn):
            raise TypeError(f"swap {key!r} must be a function; to run a block with other params "
                            "use model.with_block(layer, block_params).")
        out.append((layer, "mlp" if m.group(2) else "block", fn))
    return tuple(sorted(out, key=lambda t: (t[0], t[1])))


def _check_computed(names, swaps, entry: Optional[int], config: ModelConfig, what: str):
    """Refuses sites that the call never computes: inside a swapped block or MLP, or upstream
    of the entry point (a patch that never runs would look like "no effect")."""
    swapped = {(l, k) for l, k, _ in swaps}
    for name in names:
        layer, local = sites_lib.parse_site(name, config)
        if layer >= 0 and (layer, "block") in swapped and local not in (
                "hook_resid_pre", "hook_resid_post"):
            raise ValueError(f"{what} {name!r} is not computed: it lies inside blocks.{layer}, "
                             "which is swapped for a function.")
        if layer >= 0 and (layer, "mlp") in swapped and local in _IN_SWAPPED_MLP:
            raise ValueError(f"{what} {name!r} is not computed: it lies inside "
                             f"blocks.{layer}.mlp, which is swapped for a function.")
        if entry is not None and sites_lib.site_index(layer, local, config) < entry:
            raise ValueError(f"{what} {name!r} is not computed: it lies upstream of where this "
                             "call enters the model (record or patch it with a full forward).")


def _patch_value(value, shape: Tuple[int, ...], pos_axis: int, per_row: bool):
    """``(value at the site's rank, where-mask over positions or None)``.

    Continuation rows (``per_row``) and values of the site's full rank replace every position;
    lower-rank values replace the last position only (leading axes broadcast)."""
    xp = _xp(value)
    v = xp.asarray(value)
    rank = len(shape)
    if v.ndim > rank:
        raise ValueError(f"patch of shape {v.shape} has more axes than the site's {shape}.")
    if per_row or v.ndim == rank:
        return v.reshape((1,) * (rank - v.ndim) + v.shape), None
    v = v.reshape((1,) * (rank - 1 - v.ndim) + v.shape)
    v = xp.expand_dims(v, pos_axis)
    where = np.zeros((shape[pos_axis],) + (1,) * (rank - 1 - pos_axis), bool)
    where[-1] = True
    return v, where


def _interventions(config: ModelConfig, sites, patches, swaps, *, batch: int, new: int,
                   keys: int, entry: Optional[int], per_row: bool) -> core.Interventions:
    """The core's :class:`~plateau_jax.model.core.Interventions` for named sites and patches."""
    sites = sites_lib.validate_sites(sites, config)
    patches = dict(patches or {})
    sites_lib.validate_sites(patches, config)
    _check_computed(sites, swaps, entry, config, "site")
    _check_computed(patches, swaps, entry, config, "patch")
    by_local, rec_global = sites_lib.group_by_local(sites, config)
    iv = core.record_layers(by_local, config.n_layer)
    grouped: Dict[str, list] = {}
    for name, value in patches.items():
        layer, local = sites_lib.parse_site(name, config)
        shape = (sites_lib.site_shape(local, config, batch, new, keys) if layer >= 0
                 else (batch, new, config.d_model))
        axis = sites_lib.position_axis(local) if layer >= 0 else 1
        grouped.setdefault(local, []).append((layer,) + _patch_value(value, shape, axis, per_row))
    core_patches = {}
    for local, items in grouped.items():
        layers = [t[0] for t in items]
        if layers[0] < 0:  # a global site
            core_patches[local] = core.Patch(values=items[0][1], where=items[0][2])
            continue
        xp = _xp(*[v for _, v, _ in items])
        common = np.broadcast_shapes(*[v.shape for _, v, _ in items])
        values = xp.stack([xp.broadcast_to(v, common) for _, v, _ in items])
        where = None
        if any(w is not None for _, _, w in items):
            full = np.ones_like(next(w for _, _, w in items if w is not None))
            where = np.stack([full if w is None else w for _, _, w in items])
        core_patches[local] = core.layer_patch(values, layers, config.n_layer, where=where)
    return iv.replace(rec_global=tuple(rec_global), patches=core_patches, swaps=swaps)


def _layout(names, config: ModelConfig, rows: bool = False):
    """The static layout :func:`_select` reads records by (``rows``: continuation records, whose
    attention pattern is returned row-major, ``[B, N, H, keys]``)."""
    by_local, _ = sites_lib.group_by_local(names, config)
    out = []
    for name in names:
        layer, local = sites_lib.parse_site(name, config)
        row = -1 if layer < 0 else by_local[local].index(layer)
        out.append((name, local, row, rows and local == "attn.hook_pattern"))
    return tuple(out)


# ----------------------------------------------------------------------------- public API

def forward(model: Model, tokens, sites: Sequence[str] = (), patches: Optional[Mapping] = None,
            swaps: Optional[Mapping[str, Callable]] = None) -> Tuple[Array, Dict[str, Array]]:
    """Full forward pass.

    Args:
      model: a :class:`~plateau_jax.model.model.Model`.
      tokens: int ids ``[batch, T]`` or ``[T]`` (treated as batch 1).
      sites: full site names to record (e.g. ``blocks.3.hook_resid_post``); only these are kept.
      patches, swaps: interventions (see the module docstring).

    Returns:
      logits ``[batch, T, V]`` and ``{site: activation}``, each ``[batch, T, ...]``
      (``attn.hook_pattern``: ``[batch, n_head, T_query, T_key]``).
    """
    cfg = model.config
    ids, _ = as_ids(tokens, cfg)
    B, T = ids.shape
    swaps = _swaps(swaps, cfg)
    iv = _interventions(cfg, sites, patches, swaps, batch=B, new=T, keys=T, entry=None,
                        per_row=False)
    layout = _layout(sites_lib.validate_sites(sites, cfg), cfg)
    return _forward_jit(model.params, ids, iv, cfg, model.matmul_precision, layout)


def run_prefix(model: Model, context, lengths=None,
               swaps: Optional[Mapping[str, Callable]] = None) -> KVCache:
    """Runs contexts once and keeps every layer's keys and values.

    Args:
      context: ids ``[T_ctx]`` (one context: a cache of batch 1) or ``[batch, T_ctx]``
        (right-padded contexts).
      lengths: ``[batch]`` real lengths of padded contexts (default: all ``T_ctx``).
      swaps: block swaps to apply to the context too (keep them equal to the continuation's).
    """
    cfg = model.config
    ids, _ = as_ids(context, cfg)
    B, T = ids.shape
    if T >= cfg.n_positions:
        raise ValueError(f"context of {T} tokens leaves no position for the next token "
                         f"(n_positions={cfg.n_positions}).")
    if lengths is None:
        lengths = np.full((B,), T, np.int32)
    elif _concrete(lengths):
        arr = np.asarray(lengths)
        if arr.shape != (B,) or np.any(arr < 1) or np.any(arr > T):
            raise ValueError(f"lengths must be {B} integers in [1, {T}] (the real length of each "
                             f"padded context); got {arr.tolist()}.")
    iv = core.NONE.replace(swaps=_swaps(swaps, cfg))
    return _prefix_jit(model.params, ids, _xp(lengths).asarray(lengths, np.int32), iv, cfg,
                       model.matmul_precision)


def _rows(cache: KVCache, x, width: int, what: str):
    """``x`` as ``[B, N, width]`` and whether it came as ``[N, width]`` (a cache of batch 1)."""
    x = _xp(x).asarray(x)
    B = cache.batch
    if x.ndim == 2 and B == 1 and x.shape[-1] == width:
        return x[None], True
    if x.ndim == 3 and x.shape[0] == B and x.shape[-1] == width:
        return x, False
    want = f"[N, {width}]" + (f" or [1, N, {width}]" if B == 1 else f" ([{B}, N, {width}] for a "
                                                               f"cache of {B} contexts)")
    raise ValueError(f"{what} must have shape {want}; got {tuple(x.shape)}.")


def embed_next_token(model: Model, cache: KVCache, token_ids) -> Array:
    """``blocks.0.hook_resid_pre`` of tokens placed right after the cached context(s):
    ``[N]`` -> ``[N, d]`` for a cache of one context, ``[B, N]`` -> ``[B, N, d]``."""
    cfg = model.config
    ids = _xp(token_ids).asarray(token_ids).astype(np.int32)
    if _concrete(token_ids):
        as_ids(ids.reshape(1, -1), cfg)  # range check
    squeeze = ids.ndim == 1
    if squeeze:
        if cache.batch != 1:
            raise ValueError(f"token_ids must be [{cache.batch}, N] for a cache of "
                             f"{cache.batch} contexts; got {tuple(ids.shape)}.")
        ids = ids[None]
    x = _embed_next_jit(model.params, cache, ids, cfg)
    return x[0] if squeeze else x


def continue_from(model: Model, cache: KVCache, x, layer: int, site: str = "resid_post",
                  sites: Sequence[str] = (), patches: Optional[Mapping] = None,
                  swaps: Optional[Mapping[str, Callable]] = None):
    """Runs only the next position, from an entry site (a residual component) of ``layer`` to
    the logits.

    The context's keys/values come from ``cache``; each row of ``x`` is one value of
    ``blocks.{layer}.hook_{site}`` at the next position. Cost per row is one token's compute
    plus the attention read of the context. ``layer`` and ``site`` are runtime values: one
    compiled program serves every entry point.

    Args:
      cache: from :func:`run_prefix`.
      x: ``[N, d]`` replacement vectors (cache of one context) or ``[B, N, d]``.
      layer, site: where to enter: the entry site, a residual component ("resid_pre",
        "resid_mid", "resid_post").
      sites: full site names to record (e.g. ``blocks.3.hook_resid_post``); they must lie at or
        after the entry site.
      patches: ``{site: [N, X]}`` per-row replacements downstream (e.g. frozen mlp_out).

    Returns:
      logits ``[N, V]`` and ``{site: [N, X]}`` (``attn.hook_pattern``: ``[N, n_head,
      T_ctx + 1]``, whose padded key positions are 0); a batched cache adds a leading axis.
    """
    cfg = model.config
    entry = sites_lib.entry_index(layer, site, cfg)
    xb, squeeze = _rows(cache, x, cfg.d_model, "x")
    swaps = _swaps(swaps, cfg)
    if any(l == layer and kind == "block" for l, kind, _ in swaps) and site == "resid_mid":
        raise ValueError(f"blocks.{layer} is swapped for a function; it cannot be entered at resid_mid.")
    B, N, _ = xb.shape
    if squeeze:
        patches = {k: _xp(v).asarray(v)[None] if np.ndim(v) >= 2 else v
                   for k, v in dict(patches or {}).items()}
    iv = _interventions(cfg, sites, patches, swaps, batch=B, new=N, keys=cache.keys.shape[3] + 1,
                        entry=entry, per_row=True)
    layout = _layout(sites_lib.validate_sites(sites, cfg), cfg, rows=True)
    return _continue_jit(model.params, cache, xb.astype(model.dtype), np.int32(entry), iv, cfg,
                         model.matmul_precision, layout, squeeze)


def continue_stacked(model: Model, cache: KVCache, x, layer: int, site: str = "resid_post", *,
                     record: Optional[Mapping[str, Sequence[int]]] = None,
                     patches: Optional[Mapping[str, Tuple[Sequence[int], Array]]] = None):
    """:func:`continue_from` with layer-stacked records and patches (no per-site names).

    Args:
      cache, x, layer, site: as :func:`continue_from` (``x`` ``[B, N, d]``).
      record: ``{component: layers}`` (short or local names, e.g. ``{"resid_post": [3, 4, 5]}``);
        rows of sites upstream of the entry are NaN (never computed). Recording every layer
        keeps one compiled program for every entry layer.
      patches: ``{component: (layers, values [K, B, N, X])}``, row ``j`` of ``values`` replacing
        the component of ``layers[j]`` (e.g. frozen ``mlp_out``).

    Returns:
      logits ``[B, N, V]`` and ``{component: [K, B, N, X]}`` in the order of ``record``'s layers.
    """
    cfg = model.config
    entry = sites_lib.entry_index(layer, site, cfg)
    xb, _ = _rows(cache, x, cfg.d_model, "x")
    names = [sites_lib.site_name(l, c) for c, ls in dict(record or {}).items() for l in ls]
    sites_lib.validate_sites(names, cfg)
    for comp, (ls, _) in dict(patches or {}).items():
        _check_computed([sites_lib.site_name(l, comp) for l in ls], (), entry, cfg, "patch")
    given = dict(record or {})
    order = {sites_lib.local_name(c): c for c in given}
    iv = core.record_layers({sites_lib.local_name(c): list(ls) for c, ls in given.items()},
                            cfg.n_layer)
    if patches:
        iv = iv.replace(patches={sites_lib.local_name(c): core.layer_patch(
            v, list(ls), cfg.n_layer) for c, (ls, v) in patches.items()})
    logits, records = _continue_jit(model.params, cache, xb.astype(model.dtype), np.int32(entry),
                                    iv, cfg, model.matmul_precision)
    return logits, {order.get(k, k): v for k, v in records.items()}
