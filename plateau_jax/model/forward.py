"""Pure forward passes: full forward with recording/patching/swapping, prefix cache, continuation.

Interventions are explicit arguments:
  * ``sites``: names of activations to record (TransformerLens legacy hook names).
  * ``patches``: ``{site: value}``; a value ``[batch, X]`` replaces the site at the last
    position (one value per batch row), one of the site's full shape replaces every position.
    Freezing ``hook_attn_out``/``hook_mlp_out`` is a patch (see :mod:`plateau_jax.interventions`).
  * ``swaps``: ``{"blocks.{i}": fn}`` replaces a whole block by ``fn(resid_pre) -> resid_post``
    (position-wise, e.g. :data:`IDENTITY`); ``{"blocks.{i}.mlp": fn}`` replaces an MLP by
    ``fn(ln2_normalized) -> mlp_out``. To run a block with other params, build a new param tree
    with :func:`plateau_jax.interventions.replace_block` instead.
None of these mutate the model; every function here composes with jit, vmap and jacfwd.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import sites as sites_lib
from plateau_jax.model.config import GPT2Config
from plateau_jax.model.model import GPT2
from plateau_jax.model.modules import Block, Hooks, LayerNorm

Array = jax.Array
_SWAP_RE = re.compile(r"^blocks\.(\d+)(\.mlp)?$")


def IDENTITY(x):
    """A block swap that passes the residual stream through unchanged."""
    return x


# ----------------------------------------------------------------------------- validation

def _as_ids(tokens, config: GPT2Config):
    """Returns (ids [batch, T] int32, was_1d). Checks range and length when values are known."""
    if isinstance(tokens, jax.core.Tracer):
        ids = tokens
    else:
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
        ids = jnp.asarray(arr, jnp.int32)
    if ids.shape[-1] > config.n_positions:
        raise ValueError(
            f"sequence length {ids.shape[-1]} exceeds n_positions={config.n_positions}; "
            "shorten the input.")
    was_1d = ids.ndim == 1
    return (ids[None] if was_1d else ids), was_1d


def _norm_swaps(swaps, config: GPT2Config):
    out = []
    for key, fn in dict(swaps or {}).items():
        m = _SWAP_RE.match(key)
        if not m:
            raise ValueError(f"swap key {key!r}: expected 'blocks.{{i}}' or 'blocks.{{i}}.mlp'.")
        sites_lib.check_layer(int(m.group(1)), config, what=f"swap {key!r} layer")
        if not callable(fn):
            raise TypeError(
                f"swap {key!r} must be a function; to run a block with other params use "
                "plateau_jax.replace_block(params, layer, block_params).")
        out.append((key, fn))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def _norm_patches(patches, config: GPT2Config) -> Dict[str, Array]:
    patches = dict(patches or {})
    sites_lib.validate_sites(patches, config)
    return {k: jnp.asarray(v) for k, v in patches.items()}


# ----------------------------------------------------------------------------- pieces

def _ln(params, config: GPT2Config, x):
    return LayerNorm(config.layer_norm_epsilon, config.ln_mode).apply({"params": params}, x)


def unembedding(params, config: GPT2Config) -> Array:
    """W_U as [V, d]: ``lm_head`` when the config is untied, else ``wte``."""
    return params["wte" if config.tie_word_embeddings else "lm_head"]["weight"]


def run_block(params, config: GPT2Config, layer: int, x, hooks: Hooks, *, past_kv=None,
              past_mask=None, start: str = "resid_pre", swaps=()):
    """Runs block ``layer`` (or its swap) on ``x`` [batch, T, d]; returns (x, kv or None)."""
    swaps = dict(swaps)
    name = f"blocks.{layer}"
    if name in swaps:
        if start != "resid_pre":
            raise ValueError(f"{name} is swapped for a function; it cannot be entered at {start}.")
        x = hooks(name + ".hook_resid_pre", x)
        return hooks(name + ".hook_resid_post", swaps[name](x)), None
    return Block(config, layer).apply(
        {"params": params["h"][str(layer)]}, x, hooks, past_kv, past_mask, start,
        swaps.get(name + ".mlp"))


def _head(params, config, x, hooks):
    x = hooks("ln_final.hook_normalized", _ln(params["ln_f"], config, x))
    return x @ unembedding(params, config).T.astype(x.dtype)


def _check_recorded(hooks: Hooks):
    """Every requested site was recorded and every patch applied; else the call is refused
    (a patch that never runs would silently look like "the intervention has no effect")."""
    for what, asked, done in (("sites", hooks.sites, set(hooks.records)),
                              ("patches", set(hooks.patches), hooks.patched)):
        missing = set(asked) - done
        if missing:
            raise ValueError(
                f"{what} {sorted(missing)} were given but not computed: they lie inside a swapped "
                "block or MLP, or upstream of where the call starts.")


# ----------------------------------------------------------------------------- full forward

def _forward_impl(params, ids, patches, config, sites, swaps, with_kv=False):
    hooks = Hooks(sites, patches)
    B, T = ids.shape
    tok = hooks("hook_embed", jnp.take(params["wte"]["weight"], ids, axis=0))
    pos = params["wpe"]["weight"][:T][None]
    pos = hooks("hook_pos_embed", jnp.broadcast_to(pos, tok.shape))
    x = tok + pos
    kvs = []
    for i in range(config.n_layer):
        x, kv = run_block(params, config, i, x, hooks, swaps=swaps)
        kvs.append(kv)
    logits = _head(params, config, x, hooks)
    _check_recorded(hooks)
    return (logits, hooks.records, kvs) if with_kv else (logits, hooks.records)


_forward_jit = jax.jit(_forward_impl, static_argnums=(3, 4, 5, 6))


def forward(model: GPT2, tokens, sites: Sequence[str] = (), patches: Optional[Mapping] = None,
            swaps: Optional[Mapping[str, Callable]] = None) -> Tuple[Array, Dict[str, Array]]:
    """Full forward pass.

    Args:
      model: a :class:`GPT2`.
      tokens: int ids ``[batch, T]`` or ``[T]`` (treated as batch 1).
      sites: activation names to record; only these are kept.
      patches, swaps: interventions (see module docstring).

    Returns:
      logits ``[batch, T, V]`` and ``{site: activation}``, each ``[batch, T, ...]``
      (``attn.hook_pattern``: ``[batch, n_head, T_query, T_key]``).
    """
    cfg = model.config
    ids, _ = _as_ids(tokens, cfg)
    return _forward_jit(model.params, ids, _norm_patches(patches, cfg), cfg,
                        sites_lib.validate_sites(sites, cfg), _norm_swaps(swaps, cfg))


# ----------------------------------------------------------------------------- prefix cache

@flax.struct.dataclass
class Prefix:
    """Keys and values of a shared context, computed once.

    Unbatched: ``keys``/``values`` ``[n_layer, n_head, T_ctx, d_head]``, ``mask`` ``[T_ctx]``
    (False for right padding), ``length`` int32 scalar (real positions; the continued token sits
    at position ``length``). Batched over contexts, every field gains a leading axis.
    """

    keys: Array
    values: Array
    mask: Array
    length: Array

    @property
    def batched(self) -> bool:
        return self.keys.ndim == 5


def _prefix_impl(params, ids, lengths, config, swaps):
    _, _, kvs = _forward_impl(params, ids, {}, config, (), swaps, with_kv=True)
    B, T = ids.shape
    zeros = jnp.zeros((B, config.n_head, T, config.d_head), params["wte"]["weight"].dtype)
    ks = jnp.stack([kv[0] if kv is not None else zeros for kv in kvs], axis=1)
    vs = jnp.stack([kv[1] if kv is not None else zeros for kv in kvs], axis=1)
    mask = jnp.arange(T)[None, :] < lengths[:, None]
    return Prefix(ks, vs, mask, lengths.astype(jnp.int32))


_prefix_jit = jax.jit(_prefix_impl, static_argnums=(3, 4))


def run_prefix(model: GPT2, context, lengths=None, swaps=None) -> Prefix:
    """Runs a context once and keeps every layer's keys and values.

    Args:
      context: ids ``[T_ctx]`` (one context) or ``[batch, T_ctx]`` (right-padded contexts).
      lengths: ``[batch]`` real lengths of padded contexts (default: all ``T_ctx``).
      swaps: block swaps to apply to the context too (keep them equal to the continuation's).
    """
    cfg = model.config
    ids, was_1d = _as_ids(context, cfg)
    if ids.shape[-1] >= cfg.n_positions:
        raise ValueError(f"context of {ids.shape[-1]} tokens leaves no position for the "
                         f"continued token (n_positions={cfg.n_positions}).")
    if lengths is None:
        lengths = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
    else:
        if not isinstance(lengths, jax.core.Tracer):
            arr = np.asarray(lengths)
            if arr.shape != (ids.shape[0],) or np.any(arr < 1) or np.any(arr > ids.shape[1]):
                raise ValueError(f"lengths must be {ids.shape[0]} integers in [1, {ids.shape[1]}] "
                                 f"(the real length of each padded context); got {arr.tolist()}.")
        lengths = jnp.asarray(lengths, jnp.int32)
    p = _prefix_jit(model.params, ids, lengths, cfg, _norm_swaps(swaps, cfg))
    return jax.tree_util.tree_map(lambda a: a[0], p) if was_1d else p


def embed_last(model: GPT2, prefix: Prefix, token_ids) -> Array:
    """Residual input ``blocks.0.hook_resid_pre`` [N, d] of tokens placed right after ``prefix``."""
    p = model.params
    if not isinstance(token_ids, jax.core.Tracer):
        _as_ids(np.asarray(token_ids).reshape(-1), model.config)  # range check
    tok = jnp.take(p["wte"]["weight"], jnp.asarray(token_ids), axis=0)
    pos = jnp.take(p["wpe"]["weight"], prefix.length, axis=0)  # [d], or [batch, d]
    return tok + (pos[:, None, :] if prefix.batched else pos)


def _continue_impl(params, prefix, x, patches, config, layer, start, sites, swaps):
    hooks = Hooks(sites, patches)
    x = x[:, None, :]
    first = layer + 1 if start == "resid_post" else layer
    if start == "resid_post":
        x = hooks(sites_lib.site(layer, "resid_post"), x)
    for i in range(first, config.n_layer):
        past = (prefix.keys[i][None], prefix.values[i][None])
        x, _ = run_block(params, config, i, x, hooks, past_kv=past, past_mask=prefix.mask[None],
                         start=start if i == layer else "resid_pre", swaps=swaps)
    logits = _head(params, config, x, hooks)[:, 0]
    _check_recorded(hooks)
    records = {k: (v[:, :, 0] if k.endswith("hook_pattern") else v[:, 0])
               for k, v in hooks.records.items()}
    return logits, records


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _continue_jit(params, prefix, x, patches, config, layer, start, sites, swaps):
    if prefix.keys.ndim == 5:
        return jax.vmap(_continue_impl, in_axes=(None, 0, 0, 0) + (None,) * 5)(
            params, prefix, x, patches, config, layer, start, sites, swaps)
    return _continue_impl(params, prefix, x, patches, config, layer, start, sites, swaps)


def continue_from(model: GPT2, prefix: Prefix, x, layer: int, site: str = "resid_post",
                  sites: Sequence[str] = (), patches: Optional[Mapping] = None,
                  swaps: Optional[Mapping[str, Callable]] = None):
    """Runs only the last position, from a residual site of ``layer`` to the logits.

    The context's keys/values come from ``prefix``; each row of ``x`` is one replacement value
    of ``blocks.{layer}.hook_{site}`` at the continued position. Cost per row is one token's
    compute plus the attention read of the context.

    Args:
      prefix: from :func:`run_prefix` (batched prefixes take ``x`` ``[batch, N, d]``).
      x: ``[N, d]`` replacement vectors.
      layer, site: where to enter: site in ("resid_pre", "resid_mid", "resid_post").
      sites: activations to record; they must lie at or after the entry site.
      patches: ``{site: [N, X]}`` per-row replacements downstream (e.g. frozen mlp_out).

    Returns:
      logits ``[N, V]`` and ``{site: [N, X]}`` (``attn.hook_pattern``: ``[N, n_head, T_ctx+1]``,
      whose padded key positions are 0). Batched prefixes add a leading batch axis.
    """
    cfg = model.config
    sites_lib.check_layer(layer, cfg)
    if site not in sites_lib.RESIDUAL_SITES:
        raise ValueError(f"continuation site {site!r}: expected one of {sites_lib.RESIDUAL_SITES}.")
    sites = sites_lib.validate_sites(sites, cfg)
    entry = sites_lib.site_position(sites_lib.site(layer, site), cfg)
    early = [s for s in sites if sites_lib.site_position(s, cfg) < entry]
    if early:
        raise ValueError(f"sites {early} lie upstream of the entry point "
                         f"{sites_lib.site(layer, site)} and cannot be recorded by a continuation.")
    x = jnp.asarray(x)
    want = (prefix.keys.shape[0],) if prefix.batched else ()
    if x.ndim != len(want) + 2 or x.shape[:len(want)] != want or x.shape[-1] != cfg.n_embd:
        raise ValueError(f"x must have shape {want + ('N', cfg.n_embd)}; got {x.shape}.")
    return _continue_jit(model.params, prefix, x.astype(model.dtype), _norm_patches(patches, cfg),
                         cfg, layer, site, sites, _norm_swaps(swaps, cfg))
