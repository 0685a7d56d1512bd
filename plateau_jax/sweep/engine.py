"""The sharded sweep engine: batches of pairs x alpha steps through the prefix-cached continuation.

Data parallel over pairs: a 1-D mesh (:func:`plateau_jax.sharding.make_mesh`) over every device (all
hosts' under ``jax.distributed``), params and Gram matrices replicated, each device running the same
program on its slice of the batch via ``shard_map``. One compiled call per batch (for every
interpolation layer: the layer is a runtime value) does, for every pair: the context's keys/values
(right-padded contexts, real ``lengths``), both endpoints at ``blocks.L.hook_resid_post``
(:func:`plateau_jax.plateaus.interpolation.endpoints`), the ``n`` interpolated vectors through
layers ``L+1..``, the reductions of :mod:`plateau_jax.plateaus.metrics` (the curves :mod:`.stats`
reads) and the bisection of :mod:`.refine`; only small curves leave the device. """

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plateau_jax.jacobians.mlp import mlp_frobenius_gram, mlp_grams
from plateau_jax.model import core
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.model import Model
from plateau_jax.plateaus import interpolation, metrics
from plateau_jax.plateaus import paths as paths_lib
from plateau_jax.sharding import AXIS, make_mesh
from plateau_jax.sweep import refine

REFINE_TARGETS = ("logits", "all")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What one sweep computes (everything that changes results; hashed into the manifest).

    layers: interpolation layers L (``blocks.L.hook_resid_post``); n_steps: alpha grid
    ``linspace(0, 1, n_steps)``; path: "slerp" or "linear"; component: per-layer vector whose
    relative distance is measured; tol: refinement tolerance on alpha (0 = off);
    sharpness_width: the alpha-width w of the refined sharpness (:mod:`.stats`), >= 2 tol;
    refine: which targets get the refined boundary and sharpness: "logits" (default: a handful
    of extra rows per pair) or "all" (every layer too: ``(rounds + 2) (n_layer + 1)`` extra rows
    per pair, several times the ``n_steps`` rows of the curves themselves; docs/sweeps.md).
    """

    layers: Tuple[int, ...] = (0,)
    n_steps: int = 50
    path: str = "slerp"
    component: str = "resid_post"
    tol: float = 1e-3
    sharpness_width: float = 0.02
    refine: str = "logits"

    def __post_init__(self):
        if self.component not in sites_lib.VECTOR_COMPONENTS:
            raise ValueError(f"component {self.component!r}: expected one of "
                             f"{sites_lib.VECTOR_COMPONENTS}.")
        if self.refine not in REFINE_TARGETS:
            raise ValueError(f"refine {self.refine!r}: expected one of {REFINE_TARGETS}.")
        if self.path not in paths_lib.PATHS:
            raise ValueError(f"path {self.path!r}: expected one of {paths_lib.PATHS}.")
        paths_lib.alpha_grid(self.n_steps)
        if not self.layers or any(int(l) < 0 for l in self.layers):
            raise ValueError(f"layers {list(self.layers)}: expected layer numbers >= 0.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)}: a layer is given twice.")
        if not (self.tol >= 0 and np.isfinite(self.tol)):
            raise ValueError(f"tol={self.tol}: expected a number >= 0 (0 = no refinement).")
        if not 0 < self.sharpness_width <= 1:
            raise ValueError(f"sharpness_width={self.sharpness_width}: expected 0 < w <= 1.")
        if self.tol > self.sharpness_width / 2:
            raise ValueError(f"tol={self.tol} must be at most sharpness_width/2 = "
                             f"{self.sharpness_width / 2:g}: the refined boundary has to be located "
                             "well within the width its sharpness is measured over.")

    @property
    def alpha(self) -> np.ndarray:
        return paths_lib.alpha_grid(self.n_steps)

    @property
    def rounds(self) -> int:
        return refine.n_rounds(self.alpha, self.tol)


def _pair_curves(params, grams, prefix, tok_a, tok_b, entry, *, config, spec: SweepSpec):
    """Curves of one pair (``prefix`` a cache of one context); see
    :func:`plateau_jax.sweep.stats.pair_stats`. Every per-layer curve has a row for every layer
    (NaN before the first layer after the interpolation site), then the logits."""
    dtype = params["embed"]["W_E"].dtype
    alpha = spec.alpha
    L = config.n_layer
    every = range(L)
    component = sites_lib.local_name(spec.component)
    # Endpoints: context + token A / B at the entry site (blocks.L.hook_resid_post), one call.
    ends = interpolation.endpoints(params, config, prefix, jnp.stack([tok_a, tok_b])[None],
                                   entry)[0]
    a, b = ends[0].astype(jnp.float32), ends[1].astype(jnp.float32)
    mlp_in = sites_lib.local_name(sites_lib.mlp_input(config))  # resid_pre if parallel
    curves_iv = core.record_layers({component: every, "mlp.hook_pre": every, mlp_in: every}, L)
    refine_iv = core.record_layers({component: every}, L)

    def run(alphas, iv):
        # Stable float32 slerp (NaN for antiparallel endpoints: the pair is reported as failed).
        x = paths_lib.interpolate(a, b, alphas, spec.path).astype(dtype)  # [N, d]
        lg, rc = core.continue_from(params, config, prefix, x[None], entry, iv)
        return lg[0].astype(jnp.float32), {k: v[:, 0] for k, v in rc.items()}

    logits, rec = run(alpha, curves_iv)
    Y = rec[component].astype(jnp.float32)  # [L, n, X]
    mid = rec[mlp_in].astype(jnp.float32)  # [L, n, d]: the MLPs' inputs
    jac = jax.vmap(lambda bp, h, M: mlp_frobenius_gram(bp, config, h, {"M": M}))(
        params["blocks"], mid, grams)
    per_target = lambda f: jnp.concatenate([f(Y), f(logits)[None]])  # [L + 1, ...]
    lp = metrics.log_softmax(logits)  # [n, V]
    kl = metrics.kl_from_log_probs
    out = dict(r=per_target(metrics.relative_distance), dist=per_target(metrics.distance_curve),
               step=per_target(metrics.step_sizes), jac=jac.astype(jnp.float32),
               hamming=metrics.spline_hamming(rec["mlp.hook_pre"]),
               mid_step=metrics.step_sizes(mid), kl_a=kl(lp[:1], lp), kl_b=kl(lp[-1:], lp),
               kl_next=kl(lp[:-1], lp[1:]), angle=paths_lib.angle(a, b))
    r = out["r"]

    # Extra rows: row i serves target tgt[i] (the L layers, then the logits).
    y0, y1 = Y[:, 0], Y[:, -1]

    def measure(m, tgt):
        """r, d and log-probabilities at alphas ``m`` [R], row i measured on target tgt[i]."""
        lg, rc = run(m, refine_iv)  # [R, V], {site: [L, R, X]}
        t = jnp.clip(tgt, 0, L - 1)
        sel = rc[component].astype(jnp.float32)[t, jnp.arange(m.shape[0])]  # [R, X]
        on_layer = tgt < L
        r_m = jnp.where(on_layer, metrics.relative_distance_to(sel, y0[t], y1[t]),
                        metrics.relative_distance_to(lg, logits[0], logits[-1]))
        d_m = jnp.where(on_layer, metrics.distance_to(sel, y0[t], y1[t]),
                        metrics.distance_to(lg, logits[0], logits[-1]))
        return r_m, d_m, metrics.log_softmax(lg)

    # Refined targets: the logits (row L), or every layer too (spec.refine).
    targets = jnp.arange(L + 1) if spec.refine == "all" else jnp.array([L])
    kstar, grid = refine.steepest_step(r, alpha)
    br = refine.Bracket(grid.lo[targets], grid.hi[targets], grid.r_lo[targets],
                        grid.r_hi[targets], lp[kstar[targets]], lp[kstar[targets] + 1])

    def eval_fn(m):  # one extra row per refined target per round
        r_m, _, lp_m = measure(m, targets)
        return r_m, lp_m

    br = refine.refine_boundary(eval_fn, br, spec.rounds)
    # The fixed-width window around the refined boundary: both ends evaluated exactly.
    lo, hi = refine.window(br, spec.sharpness_width)
    r_w, d_w, _ = measure(jnp.concatenate([lo, hi]), jnp.concatenate([targets, targets]))
    T = targets.shape[0]
    full = lambda v: jnp.full((L + 1,), jnp.nan, v.dtype).at[targets].set(v)
    out.update(kstar=kstar.astype(jnp.int32), ref_lo=full(br.lo), ref_hi=full(br.hi),
               ref_r_lo=full(br.r_lo), ref_r_hi=full(br.r_hi),
               ref_kl=full(kl(br.aux_lo, br.aux_hi)), win_lo=full(lo),
               win_hi=full(hi), win_r_lo=full(r_w[:T]), win_r_hi=full(r_w[T:]),
               win_d_lo=full(d_w[:T]), win_d_hi=full(d_w[T:]))
    refined = jnp.zeros(L + 1, bool).at[targets].set(True)
    downstream = jnp.arange(L + 1) >= sites_lib.first_block(entry)  # layers, then the logits
    rows = {k: downstream for k in ("r", "dist", "step")}
    rows.update({k: downstream & refined for k in ("ref_lo", "ref_hi", "ref_kl", "win_lo",
                                                   "win_hi")})
    rows.update({"jac": downstream[:L], "hamming": downstream[:L], "mid_step": downstream[:L]})
    # r and d may be NaN where a target does not move; those are not failures.
    nan_ok = ("r", "dist", "kstar", "ref_r_lo", "ref_r_hi", "win_r_lo", "win_r_hi", "win_d_lo",
              "win_d_hi")
    checked = [jnp.where(rows[k].reshape(rows[k].shape + (1,) * (v.ndim - 1)), v, 0.0)
               if k in rows else v for k, v in out.items() if k not in nan_ok]
    out["finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in checked]
                                      + [jnp.all(jnp.isfinite(logits))]))
    for k in ("ref_r_lo", "ref_r_hi", "win_r_lo", "win_r_hi", "win_d_lo", "win_d_hi"):
        rows[k] = downstream & refined
    for k, keep in rows.items():  # targets not downstream of the interpolation: NaN
        out[k] = jnp.where(keep.reshape(keep.shape + (1,) * (out[k].ndim - 1)), out[k], jnp.nan)
    return out


def _batch_curves(params, grams, ids, lengths, tok_a, tok_b, entry, *, config, spec):
    cache = core.prefix(params, config, ids, lengths)
    one = lambda c: core.KVCache(c.keys[:, None], c.values[:, None], c.mask[None], c.length[None])
    fn = lambda c, ta, tb: _pair_curves(params, grams, one(c), ta, tb, entry, config=config,
                                        spec=spec)
    axes = core.KVCache(keys=1, values=1, mask=0, length=0)
    return jax.vmap(fn, in_axes=(axes, 0, 0))(cache, tok_a, tok_b)


@functools.lru_cache(maxsize=32)
def _compiled(config, spec: SweepSpec, mesh: Mesh, precision: str):
    """One jitted, shard-mapped batch function per (config, spec, mesh), shared by engines and
    by every interpolation layer (the layer is a runtime argument)."""
    def body(*args):
        with jax.default_matmul_precision(precision):
            return _batch_curves(*args, config=config, spec=spec)

    mapped = jax.shard_map(body, mesh=mesh,
                           in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()),
                           out_specs=P(AXIS), check_vma=False)
    return jax.jit(mapped)


class SweepEngine:
    """Runs batches of pairs for a :class:`SweepSpec` on a mesh (default: all devices).

    ``engine.run(layer, ids, lengths, tok_a, tok_b)`` takes numpy ``[B, T]`` right-padded context
    ids, ``[B]`` lengths and ending token ids (every process passes the same full batch), pads
    the batch to a multiple of the device count, and returns numpy curves ``{name: [B, ...]}``.
    """

    def __init__(self, model: Model, spec: SweepSpec, mesh: Optional[Mesh] = None):
        self.model, self.spec = model, spec
        self.config = model.config
        for L in spec.layers:
            sites_lib.check_layer(L, self.config, what="interpolation layer")
        # a parallel-residual model has no resid_mid: refused here with the site's message
        sites_lib.parse_site(sites_lib.site_name(0, spec.component), self.config)
        self.mesh = mesh or make_mesh()
        self.n_devices = self.mesh.devices.size
        self._repl = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))
        self.precision = model.matmul_precision
        with jax.default_matmul_precision(self.precision):
            grams = jax.jit(lambda blocks: jax.lax.map(
                lambda bp: mlp_grams(bp, self.config, jnp.float32)["M"], blocks))(
                    model.params["blocks"])
        self.params = self._global(model.params, self._repl)
        self.grams = self._global(grams, self._repl)

    def _global(self, tree, sharding):
        """Host values (identical on every process) -> global arrays with ``sharding``."""
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.tree_util.tree_map(one, tree)

    def _fn(self):
        return _compiled(self.config, self.spec, self.mesh, self.precision)

    def padded_size(self, n: int) -> int:
        return -(-n // self.n_devices) * self.n_devices

    def run(self, layer: int, ids, lengths, tok_a, tok_b, pad_to: Optional[int] = None
            ) -> Dict[str, np.ndarray]:
        """``pad_to``: pad the batch to this many pairs first (a fixed shape: one compilation)."""
        ids = np.asarray(ids, np.int32)
        B = ids.shape[0]
        pad = self.padded_size(max(B, pad_to or 0)) - B
        rows = [ids, np.asarray(lengths, np.int32), np.asarray(tok_a, np.int32),
                np.asarray(tok_b, np.int32)]
        if pad:  # repeat the last pair; its results are dropped
            rows = [np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for v in rows]
        args = [self._global(v, self._split) for v in rows]
        entry = self._global(np.int32(sites_lib.entry_index(layer, "resid_post", self.config)),
                             self._repl)
        out = self._fn()(self.params, self.grams, *args, entry)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:B] for k, v in out.items()}
