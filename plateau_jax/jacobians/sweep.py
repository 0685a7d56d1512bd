"""Jacobian sweeps along an interpolation path: every step and every layer in one jitted call.

Definitions (all at the last position, the context's keys/values held fixed, in the model's dtype;
``J[i, j] = d out_i / d in_j``, shape ``[d_out, d_in] = [d, d]``):

* ``mlp``   -- ``d blocks.l.hook_mlp_out / d blocks.l.hook_resid_mid`` (ln_2 included; with a
  parallel residual, as in GPT-NeoX, the MLP reads ``hook_resid_pre`` and that is the input).
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
call records ``resid_pre`` (and ``resid_mid``) of every later layer), by differentiating single-token
functions (:func:`family_fn`). All layers run in one ``lax.scan`` over stacked block params and
all steps in ``lax.map(..., batch_size=...)`` over ``vmap(jacfwd)`` so memory stays bounded;
Frobenius/spectral/top-k reductions happen inside the graph. Full matrices are returned only on
request (``full=``), after a size check.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.jacobians.mlp import (jacobian_operands, mlp_frobenius_gram, mlp_grams,
                                       mlp_jacobian)
from plateau_jax.model import core, layers
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.config import ModelConfig
from plateau_jax.model.core import KVCache
from plateau_jax.model.model import Model
from plateau_jax.model.params import block_params
from plateau_jax.jacobians.spectral import hutchinson_frobenius, power_spectral_norm, reduce_dense

Array = jax.Array

FAMILIES = ("mlp", "attn", "layer")
STATS = ("fro", "spec", "topk", "fro_hutch")
SPEC_METHODS = ("svd", "power")
MLP_METHODS = ("closed", "autodiff", "gram")
FULL_NAMES = FAMILIES + ("cumulative", "product_mlp", "product_attn")
DEFAULT_MAX_FULL_BYTES = 4 * 2 ** 30


class JacobianTooLargeError(MemoryError):
    """Requested full Jacobian matrices would not fit; reduce steps/layers or pass force=True."""


# ----------------------------------------------------------------------------- single-token fns

def _family_fn_raw(family: str, bp, config: ModelConfig, context: layers.Context, position):
    """``[d] -> [d]``: one layer's family function at the next position (``position`` ``[1]``)."""
    pos = position[:, None]
    one = lambda f: (lambda x: f(x[None, None])[0, 0])
    if family == "mlp":
        return one(lambda x: layers.mlp_part(bp, x, config))
    if family == "attn":
        return one(lambda x: layers.attn_part(bp, x, config, positions=pos, context=context)[0])
    if family == "layer":
        return one(lambda x: layers.block(bp, x, config, positions=pos, context=context)[0])
    raise ValueError(f"Unknown Jacobian family {family!r}; choose one of {FAMILIES}.")


def family_fn(model: Model, prefix: KVCache, layer: int, family: str):
    """The single-token function whose Jacobian is family ``family`` at ``layer``: ``[d] -> [d]``.

    ``mlp``: resid_mid (resid_pre with a parallel residual) -> mlp_out; ``attn``: resid_pre ->
    attn_out; ``layer``: resid_pre ->
    resid_post, with ``prefix``'s keys/values of that layer as the fixed context.
    """
    sites_lib.check_layer(layer, model.config)
    _check_prefix(prefix)
    return _family_fn_raw(family, block_params(model.params, layer), model.config,
                          prefix.layer(layer), prefix.length)


def _cumulative_raw(params, config: ModelConfig, prefix: KVCache, entry):
    """``x [d] -> [L, d]``: resid_post of every layer (NaN rows upstream of the entry)."""
    iv = core.record_layers({"hook_resid_post": range(config.n_layer)}, config.n_layer)

    def f(x):
        _, rec = core.continue_from(params, config, prefix, x[None, None], entry, iv)
        return rec["hook_resid_post"][:, 0, 0]

    return f


def cumulative_fn(model: Model, prefix: KVCache, layer: int, site: str = "resid_post"):
    """``x [d] -> [n_after, d]``: resid_post of every layer after ``blocks.layer.hook_{site}``."""
    _check_site(site)
    _check_prefix(prefix)
    cfg = model.config
    f = _cumulative_raw(model.params, cfg, prefix, sites_lib.entry_index(layer, site, cfg))
    first = sites_lib.first_layer_after(layer, site)
    return lambda x: f(x)[first:]


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

    @property
    def matrix_free_spec(self) -> bool:
        """Spectral norms of the per-layer families by power iteration (no dense matrix)."""
        return self.spec_method == "power" and "spec" in self.stats

    @property
    def product_families(self) -> Tuple[str, ...]:
        """The families whose study products are formed."""
        return tuple(f for f in ("mlp", "attn") if self.products and f in self.families)

    def gram_fro(self, family: str) -> bool:
        """Whether ``family``'s Frobenius norms come from the Gram identity instead of a dense
        matrix: the MLP with ``mlp_method="gram"`` (the one place this special case is decided)."""
        return (family == "mlp" and family in self.families and self.mlp_method == "gram"
                and "fro" in self.stats)

    def dense_stats(self, matrix_free_spec: bool) -> Tuple[str, ...]:
        """The requested reductions of a dense matrix (without "spec" when it is matrix-free)."""
        out = [s for s in ("fro", "spec", "topk") if s in self.stats]
        if matrix_free_spec and "spec" in out:
            out.remove("spec")
        return tuple(out)

    def family_dense_stats(self, family: str) -> Tuple[str, ...]:
        """The reductions of ``family``'s dense per-layer matrix (products and cumulative
        Jacobians use ``dense_stats(False)``)."""
        return tuple(s for s in self.dense_stats(self.matrix_free_spec)
                     if not (s == "fro" and self.gram_fro(family)))

    def needs_dense(self, family: str) -> bool:
        """Whether ``family``'s dense per-layer matrix is formed."""
        return (family in self.full or family in self.product_families
                or bool(self.family_dense_stats(family)))


# ----------------------------------------------------------------------------- sizes

def full_bytes(config: ModelConfig, n_steps: int, layer: int, site: str, full: Sequence[str],
               itemsize: int = 4) -> int:
    """Bytes of the full matrices ``full`` would return: n_layers x n_steps x d x d each."""
    n_layers = config.n_layer - sites_lib.first_layer_after(layer, site)
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


def check_full_size(config: ModelConfig, n_steps: int, layer: int, site: str,
                    full: Sequence[str], itemsize: int = 4, max_bytes: Optional[int] = None,
                    force: bool = False) -> int:
    """Returns the estimate; raises :class:`JacobianTooLargeError` above ``max_bytes`` (default:
    a quarter of the accelerator's memory, or 4 GiB when unknown) unless ``force``."""
    need = full_bytes(config, n_steps, layer, site, full, itemsize)
    n_layers = config.n_layer - sites_lib.first_layer_after(layer, site)
    limit = _device_limit() if max_bytes is None else int(max_bytes)
    if full and need > limit and not force:
        raise JacobianTooLargeError(
            f"full matrices {sorted(set(full))} need {_fmt_bytes(need)} "
            f"({n_layers} layers x {n_steps} steps x "
            f"{config.n_embd}^2 x {itemsize} B each), over the limit of {_fmt_bytes(limit)}. Ask for "
            "norms only (they are reduced inside the jitted call), fewer steps, or pass force=True.")
    return need


# ----------------------------------------------------------------------------- the sweep

def _reduced(name: str, J, stats: Sequence[str], opts: SweepOptions) -> Dict[str, Array]:
    """``{name}_{stat}`` reductions of ``J`` ``[..., d, d]``, and ``{name}_full`` when asked for."""
    out = {f"{name}_{k}": v for k, v in reduce_dense(J, stats, opts.top_k).items()}
    if name in opts.full:
        out[f"{name}_full"] = J
    return out


def _path_inputs(params, config: ModelConfig, prefix: KVCache, x, entry):
    """Every layer's family inputs along the path ``x`` ``[N, d]``: ``(resid_pre, MLP input)``,
    each ``[L, N, d]`` (NaN rows upstream of the entry)."""
    L = config.n_layer
    mlp_in = sites_lib.local_name(sites_lib.mlp_input(config))
    iv = core.record_layers({"hook_resid_pre": range(L), mlp_in: range(L)}, L)
    _, rec = core.continue_from(params, config, prefix, x[None], entry, iv)
    return rec["hook_resid_pre"][:, 0], rec[mlp_in][:, 0]


def _family_step(family: str, f, bp, config: ModelConfig, opts: SweepOptions, dtype):
    """``(x_i, key_i, P_i) -> {name: value}``: family ``family``'s results at one step of one
    layer (``f`` its single-token function, ``P_i`` the product so far, returned as ``_P``)."""
    dense = opts.needs_dense(family)
    closed = dense and family == "mlp" and opts.mlp_method != "autodiff"
    # per layer, outside the loop over steps (see jacobian_operands)
    ops = jacobian_operands(bp, config, dtype) if closed else None
    product = family in opts.product_families

    def step(args):
        xi, ki, Pi = args
        res = {}
        if dense:
            J = mlp_jacobian(bp, config, xi, ops) if closed else jax.jacfwd(f)(xi)
            res.update(_reduced(family, J, opts.family_dense_stats(family), opts))
            if product:
                res["_P"] = J @ Pi
                res.update(_reduced(f"product_{family}", res["_P"], opts.dense_stats(False), opts))
        k1, k2 = jax.random.split(ki)
        if opts.matrix_free_spec:
            res[f"{family}_spec"] = power_spectral_norm(f, xi, k1, opts.power_iters)
        if "fro_hutch" in opts.stats:
            est, se = hutchinson_frobenius(f, xi, k2, opts.probes)
            res[f"{family}_fro_hutch"], res[f"{family}_fro_hutch_se"] = est, se
        return res

    return step


def _layer_results(carry, inp, *, prefix: KVCache, config: ModelConfig, opts: SweepOptions,
                   dtype):
    """One layer's results of every family at every step (``inp``: the layer's slice of the
    scanned inputs; ``carry``: the running products ``[N, d, d]`` per product family)."""
    out, new_carry = {}, {}
    bp = inp["bp"]
    ctx = layers.Context(inp["keys"], inp["values"], prefix.mask)
    n = inp["pre"].shape[0]
    for fam in opts.families:
        f = _family_fn_raw(fam, bp, config, ctx, prefix.length)
        xin = inp["mid"] if fam == "mlp" else inp["pre"]
        step_keys = jax.random.split(jax.random.fold_in(inp["key"], FAMILIES.index(fam)), n)
        P = carry[fam] if fam in carry else jnp.zeros((n, 0), dtype)
        res = jax.lax.map(_family_step(fam, f, bp, config, opts, dtype), (xin, step_keys, P),
                          batch_size=min(opts.batch_size, n))
        if fam in carry:
            new_carry[fam] = res.pop("_P")
        out.update(res)
        if opts.gram_fro(fam):  # exact Frobenius norms from the Gram matrices, no d x d matrix
            out["mlp_fro"] = mlp_frobenius_gram(bp, config, xin, inp.get("grams"))
    return new_carry, out


def _per_layer(params, prefix: KVCache, x, entry, key, grams, config: ModelConfig,
               opts: SweepOptions):
    """Every per-layer family (and product) over every layer, in one ``lax.scan``; layers before
    the first block after the entry are skipped (NaN rows)."""
    N, d = x.shape
    L = config.n_layer
    pre, mid = _path_inputs(params, config, prefix, x, entry)
    xs = dict(i=jnp.arange(L), bp=params["blocks"], keys=prefix.keys, values=prefix.values,
              pre=pre, mid=mid, key=jax.random.split(key, L))
    if opts.gram_fro("mlp") and grams is not None:
        xs["grams"] = {"M": grams["M"]}
    carry0 = {f: jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), (N, d, d))
              for f in opts.product_families}
    run = functools.partial(_layer_results, prefix=prefix, config=config, opts=opts,
                            dtype=x.dtype)
    first = sites_lib.first_block(entry)

    def body(carry, inp):
        shapes = jax.eval_shape(run, carry, inp)[1]
        nan = lambda c, i: (c, jax.tree_util.tree_map(
            lambda sd: jnp.full(sd.shape, jnp.nan, sd.dtype), shapes))
        return jax.lax.cond(inp["i"] >= first, run, nan, carry, inp)

    return jax.lax.scan(body, carry0, xs)[1]


def _cumulative(params, prefix: KVCache, x, entry, config: ModelConfig, opts: SweepOptions):
    """End-to-end Jacobians ``d resid_post[l] / d x`` at every depth and step, reduced;
    ``[L, N, ...]`` with NaN rows upstream of the entry."""
    g = _cumulative_raw(params, config, prefix, entry)
    cstep = lambda xi: _reduced("cumulative", jax.jacfwd(g)(xi), opts.dense_stats(False), opts)
    cum = jax.lax.map(cstep, x, batch_size=min(opts.batch_size, x.shape[0]))  # [N, L, ...]
    L = config.n_layer
    upstream = jnp.arange(L) < sites_lib.first_block(entry)
    return {k: jnp.where(upstream.reshape((L,) + (1,) * (v.ndim - 1)), jnp.nan, v)
            for k, v in ((k, jnp.swapaxes(v, 0, 1)) for k, v in cum.items())}


def _sweep_impl(params, prefix: KVCache, x, entry, key, grams, config: ModelConfig,
                opts: SweepOptions):
    """All outputs with a leading axis over every layer (rows before the first layer after the
    entry are NaN) and the steps second."""
    out = _per_layer(params, prefix, x, entry, key, grams, config, opts)
    if opts.cumulative:
        out.update(_cumulative(params, prefix, x, entry, config, opts))
    return out


@functools.partial(jax.jit, static_argnames=("config", "opts", "precision"))
def _sweep_jit(params, prefix, x, entry, key, grams, config, opts, precision):
    with jax.default_matmul_precision(precision):
        return _sweep_impl(params, prefix, x, entry, key, grams, config, opts)


def _check_site(site):
    if site not in ("resid_post", "resid_pre"):
        raise ValueError(f"site={site!r}: Jacobian sweeps enter at 'resid_post' (the study) or "
                         "'resid_pre'.")


def _check_prefix(prefix: KVCache):
    if prefix.batch != 1:
        raise ValueError("Jacobian sweeps take a cache of one context; loop over prompt pairs.")


@functools.partial(jax.jit, static_argnames=("config", "precision"))
def _grams_jit(blocks, config, precision):
    with jax.default_matmul_precision(precision):
        return jax.lax.map(lambda bp: mlp_grams(bp, config), blocks)


def mlp_grams_for(model: Model, layers: Optional[Sequence[int]] = None) -> Dict[str, Array]:
    """Every layer's Gram matrix ``{"M": [L, m, m]}`` for ``mlp_method="gram"``; compute once,
    pass as ``grams=`` for every prompt pair (memory: L m^2 floats; without it each sweep
    computes the matrices of the layers it needs inside the call).

    ``layers`` is accepted for the callers of the first release (which stacked only the layers
    a sweep used) and checked, but every layer is computed: sweeps index the stack by layer.
    """
    if layers is not None:
        for l in layers:
            sites_lib.check_layer(int(l), model.config)
    return _grams_jit(model.params["blocks"], model.config, model.matmul_precision)


def sweep_layers(config: ModelConfig, layer: int, site: str = "resid_post") -> np.ndarray:
    """Layer index of each row of the per-layer outputs of :func:`jacobian_sweep`."""
    return np.arange(sites_lib.first_layer_after(layer, site), config.n_layer)


def jacobian_sweep(model: Model, prefix: KVCache, x, layer: int, site: str = "resid_post", *,
                   options: Optional[SweepOptions] = None, grams=None, seed: int = 0,
                   force: bool = False, max_full_bytes: Optional[int] = None,
                   to_host: bool = True, **option_kwargs) -> Dict[str, Array]:
    """Jacobians for every step of a path and every later layer, in one jitted call.

    The entry layer is a runtime value: one compiled program serves every interpolation layer.

    Args:
      model, prefix: the model and the shared context's keys/values (:func:`run_prefix`).
      x: ``[N, d]`` path values of ``blocks.{layer}.hook_{site}`` (e.g. from
        :func:`plateau_jax.plateaus.paths.interpolate`).
      layer, site: where the path is fed in: the entry site (a residual component),
        "resid_post" as in the study, or "resid_pre".
      options: a :class:`SweepOptions`, or its fields as keyword arguments.
      grams: every layer's Gram matrix from :func:`mlp_grams_for` (``mlp_method="gram"``),
        reusable across prompt pairs; computed inside the call when None.
      seed: randomness for power iteration / Hutchinson probes.
      force, max_full_bytes: see :func:`check_full_size`.
      to_host: return numpy arrays (default). False keeps jax arrays on the device (no transfer;
        e.g. to time the computation alone, or to reduce the matrices further on the device).

    Returns:
      ``{name: numpy array}`` (jax arrays with ``to_host=False``) with the layer axis first
      (rows = :func:`sweep_layers`), steps second:
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
    if x.ndim != 2 or x.shape[1] != cfg.d_model or x.shape[0] < 1:
        raise ValueError(f"x must have shape [N, {cfg.d_model}]; got {x.shape}.")
    first = sites_lib.first_layer_after(layer, site)
    if first >= cfg.n_layer:
        raise ValueError(f"no layer follows blocks.{layer}.hook_{site} (the last layer); pick an "
                         f"earlier layer (0..{cfg.n_layer - 2}) or site='resid_pre'.")
    check_full_size(cfg, x.shape[0], layer, site, opts.full, x.dtype.itemsize, max_full_bytes,
                    force)
    if grams is not None and grams["M"].shape[0] != cfg.n_layer:
        raise ValueError(f"grams cover {grams['M'].shape[0]} layers; this model has "
                         f"{cfg.n_layer} (use mlp_grams_for(model)).")
    entry = jnp.asarray(sites_lib.entry_index(layer, site, cfg), jnp.int32)
    out = _sweep_jit(model.params, prefix, x, entry, jax.random.PRNGKey(seed), grams, cfg, opts,
                     model.matmul_precision)
    if not to_host:
        return out if first == 0 else {k: v[first:] for k, v in out.items()}
    return {k: np.asarray(v)[first:] for k, v in out.items()}  # host arrays: no per-layer slice programs
