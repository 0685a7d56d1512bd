"""Interpolation runs: interpolate the last position's residual at layer L, continue, record.

One run = one jitted, batched :func:`plateau_jax.continue_from` call over every step (and every
pair) on a prefix-cached context; the context is never re-run. Freezing a component is a
patch built from a clean run (:func:`freeze_patches`) and passed to another run.

Shapes: ``batch`` is the leading shape of the endpoints ``a``/``b`` (``[d]`` gives ``()``,
``[P, d]`` gives ``(P,)``); ``n`` is the number of alpha steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import core
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.core import KVCache
from plateau_jax.model.forward import as_ids, continue_stacked
from plateau_jax.model.interventions import check_sublayer
from plateau_jax.model.model import Model
from plateau_jax.plateaus import paths as paths_lib

# Per-layer components recorded by default (short names, in execution order; see
# plateau_jax.model.sites); a model with a parallel residual records resid_pre instead of
# resid_mid (:func:`default_components`).
DEFAULT_COMPONENTS = sites_lib.VECTOR_COMPONENTS
FREEZE_MODES = ("mean", "endpoint_a", "linear")
_FREEZABLE = tuple(sites_lib.local_name(f"{s}_out") for s in sites_lib.SUBLAYERS)


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared in an interpolation run."""


def dtype_hint(dtype) -> str:
    """What to do about NaN/Inf computed in ``dtype`` (appended to error messages)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name == "float16":
        return (": float16 overflows above 65504 (activations of larger GPT-2s exceed it). Rerun "
                "with --dtype=float32.")
    if name == "bfloat16":
        return (": bfloat16 keeps 8 significant bits; rerun with --dtype=float32, and if that "
                "fails too, check the checkpoint's weights for NaN/Inf.")
    return f": the computation is in {name}, so check the checkpoint's weights for NaN/Inf."


def check_endpoints_finite(a, b, where: str, dtype) -> None:
    """Raises :class:`NonFiniteError` if endpoint ``a`` or ``b`` holds NaN/Inf (they come from
    the model, so the cause is the dtype's range or the weights, never the path)."""
    for name, v in (("A", a), ("B", b)):
        bad = ~np.isfinite(np.asarray(v, np.float64))
        if bad.any():
            idx = np.argwhere(bad)[0]
            pair = f" of pair {int(idx[0])}" if bad.ndim > 1 else ""
            raise NonFiniteError(f"endpoint {name}{pair} ({where}) is not finite (NaN/Inf computed "
                                 f"by the model from the prompt){dtype_hint(dtype)}")
def default_components(config) -> Tuple[str, ...]:
    """:data:`DEFAULT_COMPONENTS` for this model: with a parallel residual there is no
    resid_mid, and the MLP's input is resid_pre (:func:`plateau_jax.model.sites.mlp_input`)."""
    mlp_in = sites_lib.mlp_input(config)
    return tuple(mlp_in if c == "resid_mid" else c for c in DEFAULT_COMPONENTS)


def check_alpha(alpha) -> np.ndarray:
    """A valid alpha grid: 1-D, >= 2 values, strictly increasing, from exactly 0 to exactly 1
    (the endpoints are the two prompts); uniform or not. Returns it as float64."""
    alpha = np.asarray(alpha, np.float64)
    if alpha.ndim != 1 or alpha.size < 2:
        raise ValueError(f"alpha grid must be 1-D with at least 2 steps; got shape {alpha.shape}.")
    if not np.all(np.isfinite(alpha)):
        raise ValueError(f"alpha grid must be finite numbers; got {alpha.tolist()}.")
    if alpha[0] != 0.0 or alpha[-1] != 1.0 or np.any(np.diff(alpha) <= 0):
        raise ValueError("alpha grid must increase strictly from 0 (endpoint A) to 1 (endpoint B); "
                         f"got {alpha.tolist()}.")
    return alpha


# ----------------------------------------------------------------------------- endpoints

def residual_stream(params, cfg, cache: KVCache, tokens):
    """The residual stream of tokens ``[B, M]`` placed right after each cached context, at every
    entry point: ``[2 L + 1, B, M, d]``, row ``e`` the value at half-block index ``e``
    (:func:`plateau_jax.model.sites.entry_index`): row 0 is ``blocks.0.hook_resid_pre``, row
    ``2 l + 1`` ``blocks.l.hook_resid_mid`` (NaN with a parallel residual, which has none) and row
    ``2 l + 2`` ``blocks.l.hook_resid_post`` (= ``blocks.l+1.hook_resid_pre``). Pure: composes
    with ``jit`` and ``vmap``."""
    L = cfg.n_layer
    x0 = core.embed_next(params, cfg, cache, tokens)
    record = {"hook_resid_post": range(L)}
    if cfg.has_resid_mid:
        record["hook_resid_mid"] = range(L)
    _, rec = core.continue_from(params, cfg, cache, x0, 0, core.record_layers(record, L))
    post = rec["hook_resid_post"]
    mid = rec["hook_resid_mid"] if cfg.has_resid_mid else jnp.full_like(post, jnp.nan)
    halves = jnp.stack([mid, post], axis=1).reshape((2 * L,) + post.shape[1:])
    return jnp.concatenate([x0[None].astype(post.dtype), halves])


def endpoints(params, cfg, cache: KVCache, tokens, entry):
    """The value of the entry site(s) ``entry`` (half-block indices, a runtime int32 scalar or
    array ``[K]``) for tokens ``[B, M]`` after each cached context: ``entry.shape + [B, M, d]``.
    These are the interpolation endpoints (alpha = 0 and 1) of prompts that share a context.
    Traceable; :func:`endpoint_activations` is the host API."""
    return jnp.take(residual_stream(params, cfg, cache, tokens), entry, axis=0)


@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def _endpoints_jit(params, cache, tokens, entries, cfg, precision):
    with jax.default_matmul_precision(precision):
        return endpoints(params, cfg, cache, tokens, entries)


def endpoint_activations(model: Model, cache: KVCache, tokens, layers: Sequence[int],
                         site: str = "resid_post") -> np.ndarray:
    """Last-position ``blocks.{l}.hook_{site}`` of ``context + token`` for each token and each
    layer ``l``, in one call (:func:`endpoints`).

    Args:
      cache: the context's cache: one context (then ``tokens`` is ``[M]``) or ``B`` contexts
        (``tokens`` ``[B, M]``).
      tokens: int ids of endings.
      layers: layers to record.
      site: the entry site (a residual component: resid_pre, resid_mid or resid_post).

    Returns:
      ``[len(layers), M, d]`` (``[len(layers), B, M, d]`` for ``[B, M]`` tokens), residual units.
    """
    cfg = model.config
    entries = [sites_lib.entry_index(sites_lib.check_layer(int(l), cfg), site, cfg)
               for l in layers]
    ids = np.asarray(tokens)
    squeeze = ids.ndim == 1
    if ids.ndim not in (1, 2) or not ids.size or (
            cache.batch != 1 if squeeze else ids.shape[0] != cache.batch):
        raise ValueError(f"tokens must have shape [M] for a cache of one context or [B, M] for "
                         f"a cache of B contexts; got {ids.shape} for a cache of {cache.batch}.")
    ids, _ = as_ids(ids.reshape(cache.batch, -1), cfg)  # range and type checks
    out = np.asarray(_endpoints_jit(model.params, cache, ids, np.asarray(entries, np.int32), cfg,
                                    model.matmul_precision))
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class InterpolationRun:
    """Result of :func:`interpolation_run`.

    Attributes:
      layer, site: where the interpolated vectors entered (``blocks.{layer}.hook_{site}``).
      alpha: ``[n]`` the grid.
      x: ``batch + (n, d)`` the interpolated vectors fed in.
      layers: the recorded downstream layers, in order.
      acts: ``{component: batch + (len(layers), n, X)}`` at the last position (X = d, or d_mlp
        for mlp_pre/mlp_post); a component frozen by a patch records its frozen value; the
        entry layer's attn_out is NaN when entering at resid_mid (it never runs).
      logits: ``batch + (n, V)`` next-token logits, or None if not requested.
    """

    layer: int
    site: str
    alpha: np.ndarray
    x: np.ndarray
    layers: Tuple[int, ...]
    acts: Dict[str, np.ndarray]
    logits: Optional[np.ndarray]

    def act(self, component: str, layer: int) -> np.ndarray:
        """``batch + (n, X)``: one component of one recorded layer."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not recorded; recorded layers: {self.layers}.")
        return self.acts[component][..., self.layers.index(layer), :, :]


def interpolation_run(model: Model, prefix: KVCache, a, b, layer: int, alpha, *,
                      path: str = "slerp", site: str = "resid_post",
                      components: Optional[Sequence[str]] = None,
                      layers: Optional[Sequence[int]] = None, logits: bool = True,
                      patches: Optional[Mapping[str, jax.Array]] = None,
                      check_finite: bool = True) -> InterpolationRun:
    """Interpolates between ``a`` and ``b`` at ``blocks.{layer}.hook_{site}`` and continues.

    Args:
      prefix: the shared context's cache; unbatched (then ``a``, ``b`` may have any leading
        shape) or batched over B contexts (then ``a``, ``b`` are ``[B, d]``).
      a, b: ``batch + (d,)`` endpoint vectors (alpha = 0 and 1), e.g. from
        :func:`endpoint_activations`.
      alpha: ``[n]`` grid (see :func:`check_alpha`).
      path: "slerp" or "linear" (:func:`plateau_jax.plateaus.paths.interpolate`).
      site: the entry site (a residual component): "resid_post" (default), "resid_pre" or
        "resid_mid".
      components: per-layer components to record (short names; default
        :func:`default_components`).
      layers: downstream layers to record (default: every layer from
        :func:`plateau_jax.model.sites.first_layer_after` on).
      logits: also return the logits.
      patches: ``{site: batch + (n, X)}`` per-step replacements, e.g. :func:`freeze_patches`.
      check_finite: raise :class:`NonFiniteError` naming the first step and layer with NaN/Inf.
    """
    cfg = model.config
    sites_lib.entry_index(layer, site, cfg, what="interpolation")
    alpha = check_alpha(alpha)
    components = default_components(cfg) if components is None else tuple(components)
    first = sites_lib.first_layer_after(layer, site)
    layers = tuple(range(first, cfg.n_layer)) if layers is None else tuple(int(l) for l in layers)
    bad = [l for l in layers if not first <= l < cfg.n_layer]
    if bad:
        raise ValueError(f"recording layers {bad} are not downstream of blocks.{layer}.hook_{site}: "
                         f"choose from {first}..{cfg.n_layer - 1}.")
    # The path in float64 on the host, cast once to the model dtype (paths.interpolate_host).
    check_endpoints_finite(a, b, f"blocks.{layer}.hook_{site}", model.dtype)
    x = paths_lib.interpolate_host(a, b, alpha, path, dtype=model.dtype)  # batch + (n, d)
    batch, d = x.shape[:-2], x.shape[-1]
    if prefix.batch == 1:  # every path shares the one context: all rows in one batch entry
        rows = lambda t: np.reshape(t, (1, -1) + t.shape[len(batch) + 1:])
    elif batch == (prefix.batch,):
        rows = lambda t: t
    else:
        raise ValueError(f"a cache of {prefix.batch} contexts needs a, b of shape "
                         f"[{prefix.batch}, d]; got {tuple(batch) + (d,)}.")
    unrows = lambda t: np.reshape(t, batch + (alpha.size,) + t.shape[2:])
    stacked = {}
    for name, value in dict(patches or {}).items():
        l, local = sites_lib.parse_site(name, cfg)
        stacked.setdefault(local, []).append((l, rows(np.asarray(value))))
    stacked = {c: ([l for l, _ in v], np.stack([t for _, t in v])) for c, v in stacked.items()}
    if stacked and set(stacked) <= set(_FREEZABLE):
        # Freezing either component runs the same program: the other gets an inactive patch.
        like = np.zeros_like(next(iter(stacked.values()))[1])
        for c in _FREEZABLE:
            stacked.setdefault(c, ([], like))
    # Every layer is recorded (rows upstream of the entry come back NaN): one compiled program
    # serves every interpolation layer.
    everything = list(range(cfg.n_layer))
    out_logits, rec = continue_stacked(model, prefix, rows(x), layer, site,
                                       record={c: everything for c in components},
                                       patches=stacked)
    pick = np.asarray(layers, np.int32)
    acts = {c: np.moveaxis(np.asarray(rec[c])[pick].reshape(
        (len(layers),) + batch + (alpha.size,) + rec[c].shape[3:]), 0, len(batch))
            for c in components}
    run = InterpolationRun(layer, site, alpha, x, layers, acts,
                           unrows(np.asarray(out_logits)) if logits else None)
    if check_finite:
        check_run_finite(run)
    return run


def check_run_finite(run: InterpolationRun) -> None:
    """Raises :class:`NonFiniteError` naming the earliest site (in forward order) and the
    first step where a NaN or Inf appears in ``run``."""
    def first_bad(arr):
        bad = ~np.isfinite(np.asarray(arr, np.float32))
        if not bad.any():
            return None
        steps = np.nonzero(bad.reshape(-1, run.alpha.size, bad.shape[-1]).any(axis=(0, 2)))[0]
        return int(steps[0])

    where = f"interpolating at blocks.{run.layer}.hook_{run.site}"
    hint = dtype_hint(run.x.dtype)
    k = first_bad(run.x)
    if k is not None:
        raise NonFiniteError(f"NaN/Inf in the interpolated input at step {k} (alpha="
                             f"{run.alpha[k]:.4g}) {where}: the path of finite endpoints "
                             f"overflowed its dtype{hint}")
    order = sorted(run.acts, key=lambda c: sites_lib.BLOCK_SITES.index(sites_lib.local_name(c)))
    for j, layer in enumerate(run.layers):
        for c in order:
            if sites_lib.upstream_of_entry(layer, c, run.layer, run.site):
                continue
            k = first_bad(run.acts[c][..., j, :, :])
            if k is not None:
                raise NonFiniteError(
                    f"NaN/Inf at step {k} (alpha={run.alpha[k]:.4g}) in layer {layer} "
                    f"({sites_lib.site_name(layer, c)}) {where}{hint}")
    if run.logits is not None:
        k = first_bad(run.logits)
        if k is not None:
            raise NonFiniteError(f"NaN/Inf at step {k} (alpha={run.alpha[k]:.4g}) in the logits "
                                 f"{where}{hint}")


def freeze_patches(run: InterpolationRun, sublayer: str, mode: str = "mean",
                   layers: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
    """Patches that freeze ``attn_out`` or ``mlp_out`` at the last position, from a clean run.

    For each layer ``l`` (default: every recorded layer of ``run``, i.e. every layer after the
    interpolation), with ``v_k`` the clean value at step k:

    * ``"mean"``: ``mean_k v_k`` at every step (the study's choice);
    * ``"endpoint_a"``: ``v_0`` at every step;
    * ``"linear"``: ``v_0 + alpha_k (v_{n-1} - v_0)``, the straight line between the endpoints.

    ``sublayer`` is "attn" or "mlp" (``run`` must have recorded ``{sublayer}_out``).
    Returns ``{site: batch + (n, d)}`` for :func:`interpolation_run`'s ``patches``.
    """
    check_sublayer(sublayer)
    if mode not in FREEZE_MODES:
        raise ValueError(f"Unknown freeze mode {mode!r}; choose one of {FREEZE_MODES}.")
    key = f"{sublayer}_out"
    if key not in run.acts:
        raise ValueError(f"freezing {sublayer!r} needs a run that recorded {key!r} "
                         "(components 'attn_out' and 'mlp_out' are recorded by default).")
    layers = run.layers if layers is None else tuple(int(l) for l in layers)
    alpha = np.asarray(run.alpha, run.acts[key].dtype)[:, None]
    values = {}
    for l in layers:
        v = run.act(key, l)  # batch + (n, d)
        if sites_lib.upstream_of_entry(l, key, run.layer, run.site):
            continue  # entering at resid_mid skips that layer's attention
        if mode == "mean":
            f = np.mean(v, axis=-2, keepdims=True)
        elif mode == "endpoint_a":
            f = v[..., :1, :]
        else:
            f = v[..., :1, :] + alpha * (v[..., -1:, :] - v[..., :1, :])
        values[sites_lib.site_name(l, key)] = np.broadcast_to(f, v.shape)
    return values
