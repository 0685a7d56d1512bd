"""Jacobian sweeps along an interpolation path: every step and every layer in one jitted call.

Definitions (all at the last position, the context's keys/values held fixed, in the model's dtype;
``J[i, j] = d out_i / d in_j``, shape ``[d_out, d_in] = [d, d]``):

* ``mlp``   -- ``d blocks.l.hook_mlp_out / d blocks.l.hook_resid_mid`` (ln_2 included).
* ``attn``  -- ``d blocks.l.hook_attn_out / d blocks.l.hook_resid_pre`` (ln_1 included; the
  last token's own query, key and value vary, the context's keys/values do not).
* ``layer`` -- ``d blocks.l.hook_resid_post / d blocks.l.hook_resid_pre`` (the whole block,
  skip paths included).
* ``cumulative`` -- ``d blocks.l.hook_resid_post / d x`` for every ``l`` after the interpolated
  site ``x`` (``blocks.l0.hook_resid_post``, or ``hook_resid_pre``), all depths from one
  forward-mode pass (``jacfwd``: one ``jvp`` with d tangents). The true end-to-end derivative;
  the chain rule gives ``cumulative[l] = layer[l] @ cumulative[l-1]``.
* ``product_mlp`` / ``product_attn`` -- the study's products ``J_l ... J_first`` of per-layer
  MLP or attention Jacobians. They leave out the skip path, so they are *not* end-to-end
  derivatives; kept, and labelled, only for comparison with the study's figures. (The product
  of ``layer`` Jacobians is the cumulative Jacobian.) The study's "full residual" Jacobian
  applied block ``l0`` a second time to ``resid_post[l0]``; ours starts at ``l0 + 1``.

Per-layer Jacobians are evaluated at the activations recorded along the path (one continuation
call records ``resid_pre``/``resid_mid`` of every later layer), by differentiating single-token
functions (:func:`family_fn`). All layers run in one ``lax.scan`` over stacked block params and
all steps in ``lax.map(..., batch_size=...)`` over ``vmap(jacfwd)`` so memory stays bounded;
Frobenius/spectral/top-k reductions happen inside the graph. Full matrices are returned only on
request (``full=``), after a size check.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import sites as sites_lib
from plateau_jax.model.config import GPT2Config
from plateau_jax.model.forward import Prefix, _continue_impl
from plateau_jax.model.model import GPT2
from plateau_jax.model.modules import MLP, Attention, Block, Hooks, LayerNorm
from plateau_jax.jacobians.mlp import mlp_frobenius_gram, mlp_grams, mlp_jacobian
from plateau_jax.jacobians.spectral import hutchinson_frobenius, power_spectral_norm, reduce_dense

Array = jax.Array

FAMILIES = ("mlp", "attn", "layer")
STATS = ("fro", "spec", "topk", "fro_hutch")
SPEC_METHODS = ("svd", "power")
MLP_METHODS = ("closed", "autodiff", "gram")
FULL_NAMES = FAMILIES + ("cumulative", "product_mlp", "product_attn")
DEFAULT_MAX_FULL_BYTES = 4 * 2 ** 30
# Gram matrices of all layers are precomputed up front below this size, else layer by layer.
GRAM_BYTES = 2 * 2 ** 30


class JacobianTooLargeError(MemoryError):
    """Requested full Jacobian matrices would not fit; reduce steps/layers or pass force=True."""


# ----------------------------------------------------------------------------- single-token fns

def _ln(p, config, x):
    return LayerNorm(config.layer_norm_epsilon, config.ln_mode).apply({"params": p}, x)


def _mlp_out(bp, config: GPT2Config, h: Array) -> Array:
    u = _ln(bp["ln_2"], config, h)
    return MLP(config).apply({"params": bp["mlp"]}, u, Hooks(), "")


def _attn_out(bp, config: GPT2Config, keys, values, mask, x: Array) -> Array:
    u = _ln(bp["ln_1"], config, x)[None, None]
    out, _ = Attention(config).apply({"params": bp["attn"]}, u, Hooks(), "",
                                     (keys[None], values[None]), mask[None])
    return out[0, 0]


def _block_out(bp, config: GPT2Config, keys, values, mask, x: Array) -> Array:
    out, _ = Block(config, 0).apply({"params": bp}, x[None, None], Hooks(),
                                    (keys[None], values[None]), mask[None])
    return out[0, 0]


def _family_fn_raw(family, bp, config, keys, values, mask):
    if family == "mlp":
        return functools.partial(_mlp_out, bp, config)
    if family == "attn":
        return functools.partial(_attn_out, bp, config, keys, values, mask)
    if family == "layer":
        return functools.partial(_block_out, bp, config, keys, values, mask)
    raise ValueError(f"Unknown Jacobian family {family!r}; choose one of {FAMILIES}.")


def family_fn(model: GPT2, prefix: Prefix, layer: int, family: str):
    """The single-token function whose Jacobian is family ``family`` at ``layer``: ``[d] -> [d]``.

    ``mlp``: resid_mid -> mlp_out; ``attn``: resid_pre -> attn_out; ``layer``: resid_pre ->
    resid_post, with ``prefix``'s keys/values of that layer as the fixed context.
    """
    sites_lib.check_layer(layer, model.config)
    _check_prefix(prefix)
    return _family_fn_raw(family, model.params["h"][str(layer)], model.config,
                          prefix.keys[layer], prefix.values[layer], prefix.mask)


def _first_layer(layer0: int, site: str) -> int:
    return layer0 + 1 if site == "resid_post" else layer0


def _cumulative_raw(params, config, prefix, layer0, site, layers):
    targets = tuple(sites_lib.site(l, "resid_post") for l in layers)

    def f(x):
        _, rec = _continue_impl(params, prefix, x[None], {}, config, layer0, site, targets, ())
        return jnp.stack([rec[t][0] for t in targets])  # [n_layers, d]

    return f


def cumulative_fn(model: GPT2, prefix: Prefix, layer: int, site: str = "resid_post"):
    """``x [d] -> [n_after, d]``: resid_post of every layer after ``blocks.layer.hook_{site}``."""
    _check_site(site)
    _check_prefix(prefix)
    layers = tuple(range(_first_layer(layer, site), model.config.n_layer))
    return _cumulative_raw(model.params, model.config, prefix, layer, site, layers)


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What :func:`jacobian_sweep` computes (hashable: a static jit argument).

    Attributes:
      families: per-layer families among ("mlp", "attn", "layer").
      stats: reductions among "fro" (exact Frobenius), "spec" (spectral norm), "topk" (top-k
        singular values), "fro_hutch" (Hutchinson estimate of the Frobenius norm + stderr).
      top_k: number of singular values for "topk".
      spec_method: "svd" (exact, from the dense matrix) or "power" (matrix-free power
        iteration with jvp/vjp; per-layer families only -- cumulative/products use svd).
      mlp_method: "closed" (closed-form dense MLP Jacobian), "autodiff" (jacfwd), or "gram"
        (exact Frobenius norms from per-layer Gram matrices, no d x d matrix; only "fro" then
        avoids the dense matrix).
      products: also the study's products of MLP / attention Jacobians (skip path left out).
      cumulative: also the end-to-end cumulative Jacobians at every depth.
      full: names whose full matrices are returned (from FULL_NAMES).
      batch_size: steps per vectorised chunk (``lax.map`` batch size); lower it for big models.
      power_iters, probes: power-iteration steps and Hutchinson probes.
    """

    families: Tuple[str, ...] = FAMILIES
    stats: Tuple[str, ...] = ("fro",)
    top_k: int = 0
    spec_method: str = "svd"
    mlp_method: str = "closed"
    products: bool = False
    cumulative: bool = True
    full: Tuple[str, ...] = ()
    batch_size: int = 8
    power_iters: int = 30
    probes: int = 16

    def __post_init__(self):
        for name, vals, allowed in (("families", self.families, FAMILIES),
                                    ("stats", self.stats, STATS), ("full", self.full, FULL_NAMES)):
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {allowed}.")
        if self.spec_method not in SPEC_METHODS:
            raise ValueError(f"spec_method={self.spec_method!r}: choose one of {SPEC_METHODS}.")
        if self.mlp_method not in MLP_METHODS:
            raise ValueError(f"mlp_method={self.mlp_method!r}: choose one of {MLP_METHODS}.")
        if "topk" in self.stats and self.top_k < 1:
            raise ValueError("stats include 'topk' but top_k < 1.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1.")
        if self.products and not ({"mlp", "attn"} & set(self.families)):
            raise ValueError("products=True needs family 'mlp' or 'attn'.")
        for name in self.full:
            if name in FAMILIES and name not in self.families:
                raise ValueError(f"full={name!r} but family {name!r} is not computed.")
            if name.startswith("product_") and not (self.products and name[8:] in self.families):
                raise ValueError(f"full={name!r} needs products=True and family {name[8:]!r}.")
            if name == "cumulative" and not self.cumulative:
                raise ValueError("full='cumulative' needs cumulative=True.")

    def dense_stats(self, matrix_free_spec: bool) -> Tuple[str, ...]:
        out = [s for s in ("fro", "spec", "topk") if s in self.stats]
        if matrix_free_spec and "spec" in out:
            out.remove("spec")
        return tuple(out)

    def needs_dense(self, family: str) -> bool:
        if family in self.full or (self.products and family in ("mlp", "attn")):
            return True
        if "topk" in self.stats or ("spec" in self.stats and self.spec_method == "svd"):
            return True
        return "fro" in self.stats and not (family == "mlp" and self.mlp_method == "gram")


# ----------------------------------------------------------------------------- sizes

def full_bytes(config: GPT2Config, n_steps: int, layer: int, site: str, full: Sequence[str],
               itemsize: int = 4) -> int:
    """Bytes of the full matrices ``full`` would return: n_layers x n_steps x d x d each."""
    n_layers = config.n_layer - _first_layer(layer, site)
    return len(set(full)) * n_layers * n_steps * config.n_embd ** 2 * itemsize


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _device_limit() -> int:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) // 4
    except Exception:  # CPU backends may not report memory
        pass
    return DEFAULT_MAX_FULL_BYTES


def check_full_size(config: GPT2Config, n_steps: int, layer: int, site: str,
                    full: Sequence[str], itemsize: int = 4, max_bytes: Optional[int] = None,
                    force: bool = False) -> int:
    """Returns the estimate; raises :class:`JacobianTooLargeError` above ``max_bytes`` (default:
    a quarter of the accelerator's memory, or 4 GiB when unknown) unless ``force``."""
    need = full_bytes(config, n_steps, layer, site, full, itemsize)
    limit = _device_limit() if max_bytes is None else int(max_bytes)
    if full and need > limit and not force:
        raise JacobianTooLargeError(
            f"full matrices {sorted(set(full))} need {_fmt_bytes(need)} "
            f"({config.n_layer - _first_layer(layer, site)} layers x {n_steps} steps x "
            f"{config.n_embd}^2 x {itemsize} B each), over the limit of {_fmt_bytes(limit)}. Ask for "
            "norms only (they are reduced inside the jitted call), fewer steps, or pass force=True.")
    return need


# ----------------------------------------------------------------------------- the sweep

def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _sweep_impl(params, prefix, x, key, grams, config: GPT2Config, layer0: int, site: str,
                opts: SweepOptions):
    N, d = x.shape
    first = _first_layer(layer0, site)
    layers = tuple(range(first, config.n_layer))
    nL = len(layers)
    rec_sites = tuple(sites_lib.site(l, s) for l in layers for s in ("resid_pre", "resid_mid")
                      if not (s == "resid_pre" and site == "resid_mid" and l == layer0))
    _, rec = _continue_impl(params, prefix, x, {}, config, layer0, site, rec_sites, ())
    pre = jnp.stack([rec[sites_lib.site(l, "resid_pre")] for l in layers])  # [nL, N, d]
    mid = jnp.stack([rec[sites_lib.site(l, "resid_mid")] for l in layers])
    bps = _stack([params["h"][str(l)] for l in layers])
    k_layers, k_cum = jax.random.split(key)
    xs = dict(bp=bps, keys=prefix.keys[first:], values=prefix.values[first:], pre=pre, mid=mid,
              key=jax.random.split(k_layers, nL))
    use_gram = "mlp" in opts.families and opts.mlp_method == "gram" and "fro" in opts.stats
    if use_gram and grams is None and nL * config.n_inner ** 2 * x.dtype.itemsize <= GRAM_BYTES:
        # top-level products (outside the layer loop) keep XLA's fastest dot kernels
        grams = _stack([mlp_grams(params["h"][str(l)], config, x.dtype) for l in layers])
    if use_gram and grams is not None:
        xs["grams"] = grams
    prod_fams = tuple(f for f in ("mlp", "attn") if opts.products and f in opts.families)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), (N, d, d))
    carry0 = {f: eye for f in prod_fams}
    power = opts.spec_method == "power" and "spec" in opts.stats
    dstats = opts.dense_stats(matrix_free_spec=power)

    def layer_body(carry, inp):
        out, new_carry = {}, {}
        bp = inp["bp"]
        for fam in opts.families:
            f = _family_fn_raw(fam, bp, config, inp["keys"], inp["values"], prefix.mask)
            xin = inp["mid"] if fam == "mlp" else inp["pre"]
            dense = opts.needs_dense(fam)
            has_prod = fam in prod_fams

            def step(args, f=f, fam=fam, dense=dense, has_prod=has_prod):
                xi, ki, Pi = args
                res = {}
                if dense:
                    if fam == "mlp" and opts.mlp_method != "autodiff":
                        J = mlp_jacobian(bp, config, xi)
                    else:
                        J = jax.jacfwd(f)(xi)
                    res.update({f"{fam}_{k}": v for k, v in reduce_dense(J, dstats, opts.top_k).items()
                                if not (k == "fro" and fam == "mlp" and use_gram)})
                    if fam in opts.full:
                        res[f"{fam}_full"] = J
                    if has_prod:
                        Pn = J @ Pi
                        res.update({f"product_{fam}_{k}": v
                                    for k, v in reduce_dense(Pn, opts.dense_stats(False),
                                                             opts.top_k).items()})
                        res["_P"] = Pn
                        if f"product_{fam}" in opts.full:
                            res[f"product_{fam}_full"] = Pn
                k1, k2 = jax.random.split(ki)
                if power:
                    res[f"{fam}_spec"] = power_spectral_norm(f, xi, k1, opts.power_iters)
                if "fro_hutch" in opts.stats:
                    est, se = hutchinson_frobenius(f, xi, k2, opts.probes)
                    res[f"{fam}_fro_hutch"], res[f"{fam}_fro_hutch_se"] = est, se
                return res

            step_keys = jax.random.split(jax.random.fold_in(inp["key"], FAMILIES.index(fam)), N)
            P = carry[fam] if has_prod else jnp.zeros((N, 0), x.dtype)
            res = jax.lax.map(step, (xin, step_keys, P), batch_size=min(opts.batch_size, N))
            if has_prod:
                new_carry[fam] = res.pop("_P")
            out.update(res)
            if fam == "mlp" and use_gram:
                out["mlp_fro"] = mlp_frobenius_gram(bp, config, xin, inp.get("grams"))
        return new_carry, out

    _, per_layer = jax.lax.scan(layer_body, carry0, xs)

    if opts.cumulative:
        g = _cumulative_raw(params, config, prefix, layer0, site, layers)

        def cstep(xi):
            J = jax.jacfwd(g)(xi)  # [nL, d, d]
            res = {f"cumulative_{k}": v for k, v in reduce_dense(J, opts.dense_stats(False),
                                                                 opts.top_k).items()}
            if "cumulative" in opts.full:
                res["cumulative_full"] = J
            return res

        cum = jax.lax.map(cstep, x, batch_size=min(opts.batch_size, N))
        per_layer.update({k: jnp.swapaxes(v, 0, 1) for k, v in cum.items()})  # -> [nL, N, ...]
    return per_layer


_sweep_jit = jax.jit(_sweep_impl, static_argnums=(5, 6, 7, 8))


def _check_site(site):
    if site not in ("resid_post", "resid_pre"):
        raise ValueError(f"site={site!r}: Jacobian sweeps start at 'resid_post' (the study) or "
                         "'resid_pre'.")


def _check_prefix(prefix):
    if prefix.batched:
        raise ValueError("Jacobian sweeps take one (unbatched) prefix; loop over prompt pairs.")


def mlp_grams_for(model: GPT2, layers: Sequence[int]) -> Dict[str, Array]:
    """Stacked per-layer Gram matrices ``{"M"}`` ``[len(layers), m, m]`` for
    ``mlp_method="gram"``; compute once, pass as ``grams=`` for every prompt pair."""
    cfg = model.config
    layers = tuple(int(l) for l in layers)
    fn = jax.jit(lambda bp: mlp_grams(bp, cfg))
    out = [fn(model.params["h"][str(l)]) for l in layers]
    return _stack(out)


def sweep_layers(config: GPT2Config, layer: int, site: str = "resid_post") -> np.ndarray:
    """Layer index of each row of the per-layer outputs of :func:`jacobian_sweep`."""
    return np.arange(_first_layer(layer, site), config.n_layer)


def jacobian_sweep(model: GPT2, prefix: Prefix, x, layer: int, site: str = "resid_post", *,
                   options: Optional[SweepOptions] = None, grams=None, seed: int = 0,
                   force: bool = False, max_full_bytes: Optional[int] = None,
                   **option_kwargs) -> Dict[str, Array]:
    """Jacobians for every step of a path and every later layer, in one jitted call.

    Args:
      model, prefix: the model and the shared context's keys/values (:func:`run_prefix`).
      x: ``[N, d]`` path values of ``blocks.{layer}.hook_{site}`` (e.g. from
        :func:`plateau_jax.paths.interpolate`).
      layer, site: where the path is fed in ("resid_post" as in the study, or "resid_pre").
      options: a :class:`SweepOptions`, or its fields as keyword arguments.
      grams: stacked per-layer Gram matrices from :func:`mlp_grams_for` (``mlp_method="gram"``),
        reusable across prompt pairs; computed inside the call when None.
      seed: randomness for power iteration / Hutchinson probes.
      force, max_full_bytes: see :func:`check_full_size`.

    Returns:
      ``{name: array}`` with the layer axis first (rows = :func:`sweep_layers`), steps second:
      ``{fam}_fro``/``{fam}_spec`` ``[L, N]``, ``{fam}_topk`` ``[L, N, k]``,
      ``{fam}_fro_hutch``/``{fam}_fro_hutch_se`` ``[L, N]``, ``{fam}_full`` ``[L, N, d, d]`` for
      fam in families + "cumulative" + "product_mlp"/"product_attn" (cumulative and products:
      row l is the derivative up to the resid_post / product up to layer l).
    """
    opts = options if options is not None else SweepOptions(**option_kwargs)
    if options is not None and option_kwargs:
        raise ValueError("pass either options= or option keyword arguments, not both.")
    cfg = model.config
    sites_lib.check_layer(layer, cfg)
    _check_site(site)
    _check_prefix(prefix)
    x = jnp.asarray(x, model.dtype)
    if x.ndim != 2 or x.shape[1] != cfg.n_embd or x.shape[0] < 1:
        raise ValueError(f"x must have shape [N, {cfg.n_embd}]; got {x.shape}.")
    if _first_layer(layer, site) >= cfg.n_layer:
        raise ValueError(f"no layer follows blocks.{layer}.hook_{site}; pick an earlier layer.")
    check_full_size(cfg, x.shape[0], layer, site, opts.full, x.dtype.itemsize, max_full_bytes,
                    force)
    if grams is not None:
        nL = cfg.n_layer - _first_layer(layer, site)
        if grams["M"].shape[0] != nL:
            raise ValueError(f"grams cover {grams['M'].shape[0]} layers; this sweep needs {nL} "
                             f"(layers {_first_layer(layer, site)}..{cfg.n_layer - 1}).")
    return _sweep_jit(model.params, prefix, x, jax.random.PRNGKey(seed), grams, cfg, layer,
                      site, opts)
