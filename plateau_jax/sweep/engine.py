"""The sharded sweep engine: batches of pairs x alpha steps through the prefix-cached continuation.

Data parallel over pairs: a 1-D mesh ``("pairs",)`` over every device (all hosts' under
``jax.distributed``), params and Gram matrices replicated, each device running the same program on
its slice of the batch via ``shard_map``. One call per batch does, for every pair: the context's
keys/values (right-padded contexts, real ``lengths``), both endpoints at ``blocks.L.hook_resid_post``,
the ``n`` interpolated vectors through layers ``L+1..``, the reductions of :mod:`.stats` and the
bisection of :mod:`.refine`; only small curves leave the device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plateau_jax.plateaus import paths as paths_lib
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.forward import _continue_impl, _prefix_impl
from plateau_jax.model.model import GPT2
from plateau_jax.jacobians.mlp import mlp_frobenius_gram, mlp_grams
from plateau_jax.sweep import refine, stats

COMPONENTS = ("resid_post", "resid_mid", "attn_out", "mlp_out", "mlp_post", "mlp_pre")
_HOOK = {"mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post"}
AXIS = "pairs"


def component_site(layer: int, component: str) -> str:
    return sites_lib.site(layer, _HOOK.get(component, component))


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What one sweep computes (everything that changes results; hashed into the manifest).

    layers: interpolation layers L (``blocks.L.hook_resid_post``); n_steps: alpha grid
    ``linspace(0, 1, n_steps)``; path: "slerp" or "linear"; component: per-layer vector whose
    relative distance is measured; tol: refinement tolerance on alpha (0 = off);
    sharpness_width: the alpha-width w of the refined sharpness (:mod:`.stats`), >= 2 tol.
    """

    layers: Tuple[int, ...] = (0,)
    n_steps: int = 50
    path: str = "slerp"
    component: str = "resid_post"
    tol: float = 1e-3
    sharpness_width: float = 0.02

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r}: expected one of {COMPONENTS}.")
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


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def _pair_curves(params, grams, prefix, tok_a, tok_b, *, config, layer, spec: SweepSpec):
    """Curves of one pair (unbatched ``prefix``); see :func:`plateau_jax.sweep.stats.pair_stats`."""
    dtype = params["wte"]["weight"].dtype
    alpha = spec.alpha
    entry = sites_lib.site(layer, "resid_post")
    # Endpoints: context + token A / B, up to blocks.L.hook_resid_post, one call for both.
    toks = jnp.stack([tok_a, tok_b])
    x0 = (jnp.take(params["wte"]["weight"], toks, axis=0)
          + jnp.take(params["wpe"]["weight"], prefix.length, axis=0))
    _, rec = _continue_impl(params, prefix, x0, {}, config, 0, "resid_pre", (entry,), ())
    a, b = rec[entry][0].astype(jnp.float32), rec[entry][1].astype(jnp.float32)
    layers = list(range(layer + 1, config.n_layer))
    ysites = [component_site(l, spec.component) for l in layers]
    pres = [component_site(l, "mlp_pre") for l in layers]
    mids = [component_site(l, "resid_mid") for l in layers]
    sites = tuple(sorted(set(ysites + pres + mids)))

    def run(alphas):
        # Stable float32 slerp (NaN for antiparallel endpoints: the pair is reported as failed).
        x = paths_lib.interpolate(a, b, alphas, spec.path).astype(dtype)  # [N, d]
        return _continue_impl(params, prefix, x, {}, config, layer, "resid_post", sites, ())

    logits, rec = run(alpha)
    logits = logits.astype(jnp.float32)
    f32 = lambda s: rec[s].astype(jnp.float32)
    r_list, d_list, step_list = [], [], []
    if layers:
        Y = jnp.stack([f32(s) for s in ysites])  # [nl, n, X]
        r_list.append(stats.rel_distance(Y))
        d_list.append(stats.dist_curve(Y))
        step_list.append(stats.step_norms(Y))
        mid = jnp.stack([f32(s) for s in mids])  # [nl, n, d]
        jac = jnp.stack([mlp_frobenius_gram(params["h"][str(l)], config, mid[i],
                                                     grams[str(l)]) for i, l in enumerate(layers)])
        ham = stats.hamming_steps(jnp.stack([rec[s] for s in pres]))
        mid_step = stats.step_norms(mid)
    else:
        n = alpha.size
        jac, ham, mid_step = (jnp.zeros((0, n)), jnp.zeros((0, n - 1)), jnp.zeros((0, n - 1)))
    r_list.append(stats.rel_distance(logits)[None])
    d_list.append(stats.dist_curve(logits)[None])
    step_list.append(stats.step_norms(logits)[None])
    r = jnp.concatenate(r_list)  # [T, n]
    lp = jax.nn.log_softmax(logits, axis=-1)  # [n, V]
    out = dict(r=r, dist=jnp.concatenate(d_list), step=jnp.concatenate(step_list),
               jac=jac.astype(jnp.float32), hamming=ham, mid_step=mid_step,
               kl_a=stats.kl_logp(lp[:1], lp), kl_b=stats.kl_logp(lp[-1:], lp),
               kl_next=stats.kl_logp(lp[:-1], lp[1:]), angle=paths_lib.angle(a, b))

    # Extra rows: row i serves target tgt[i] (layers in order, then the logits).
    T = r.shape[0]
    nl = len(layers)
    if layers:
        y0, y1 = Y[:, 0], Y[:, -1]

    def measure(m, tgt):
        """r, d and log-probabilities at alphas ``m`` [R], row i measured on target tgt[i]."""
        lg, rc = run(m)  # [R, V], {site: [R, X]}
        lg = lg.astype(jnp.float32)
        r_m = stats.rel_distance_to(lg, logits[0], logits[-1])
        d_m = stats.dist_to(lg, logits[0], logits[-1])
        if layers:
            t = jnp.clip(tgt, 0, nl - 1)
            Ym = jnp.stack([rc[s].astype(jnp.float32) for s in ysites])  # [nl, R, X]
            sel = Ym[t, jnp.arange(m.shape[0])]  # [R, X]
            r_m = jnp.where(tgt < nl, stats.rel_distance_to(sel, y0[t], y1[t]), r_m)
            d_m = jnp.where(tgt < nl, stats.dist_to(sel, y0[t], y1[t]), d_m)
        return r_m, d_m, jax.nn.log_softmax(lg, axis=-1)

    targets = jnp.arange(T)
    kstar, br = refine.steepest_step(r, alpha)
    br = br._replace(aux_lo=lp[kstar], aux_hi=lp[kstar + 1])

    def eval_fn(m):  # one extra row per target per round
        r_m, _, lp_m = measure(m, targets)
        return r_m, lp_m

    br = refine.refine_boundary(eval_fn, br, spec.rounds)
    out.update(kstar=kstar.astype(jnp.int32), ref_lo=br.lo, ref_hi=br.hi, ref_r_lo=br.r_lo,
               ref_r_hi=br.r_hi, ref_kl=stats.kl_logp(br.aux_lo, br.aux_hi))
    # The fixed-width window around the refined boundary: both ends evaluated exactly.
    lo, hi = refine.window(br, spec.sharpness_width)
    r_w, d_w, _ = measure(jnp.concatenate([lo, hi]), jnp.concatenate([targets, targets]))
    out.update(win_lo=lo, win_hi=hi, win_r_lo=r_w[:T], win_r_hi=r_w[T:], win_d_lo=d_w[:T],
               win_d_hi=d_w[T:])
    # NaN-tolerant curves (r and d are NaN where a target does not move) are left out.
    skip = ("r", "dist", "kstar", "ref_r_lo", "ref_r_hi", "win_r_lo", "win_r_hi", "win_d_lo",
            "win_d_hi")
    out["finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for k, v in out.items()
                                       if k not in skip] + [jnp.all(jnp.isfinite(logits))]))
    return out


def _batch_curves(params, grams, ids, lengths, tok_a, tok_b, *, config, layer, spec):
    prefix = _prefix_impl(params, ids, lengths, config, ())
    fn = functools.partial(_pair_curves, config=config, layer=layer, spec=spec)
    return jax.vmap(fn, in_axes=(None, None, 0, 0, 0))(params, grams, prefix, tok_a, tok_b)


@functools.lru_cache(maxsize=32)
def _compiled(config, layer: int, spec: SweepSpec, mesh: Mesh):
    """One jitted, shard-mapped batch function per (config, layer, spec, mesh), shared by engines."""
    body = functools.partial(_batch_curves, config=config, layer=layer, spec=spec)
    mapped = jax.shard_map(body, mesh=mesh,
                           in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
                           out_specs=P(AXIS), check_vma=False)
    return jax.jit(mapped)


class SweepEngine:
    """Runs batches of pairs for a :class:`SweepSpec` on a mesh (default: all devices).

    ``engine.run(layer, ids, lengths, tok_a, tok_b)`` takes numpy ``[B, T]`` right-padded context
    ids, ``[B]`` lengths and ending token ids (every process passes the same full batch), pads
    the batch to a multiple of the device count, and returns numpy curves ``{name: [B, ...]}``.
    """

    def __init__(self, model: GPT2, spec: SweepSpec, mesh: Optional[Mesh] = None):
        self.model, self.spec = model, spec
        self.config = model.config
        for L in spec.layers:
            sites_lib.check_layer(L, self.config, what="interpolation layer")
        self.mesh = mesh or make_mesh()
        self.n_devices = self.mesh.devices.size
        self._repl = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))
        first = min(spec.layers) + 1
        grams = {str(l): mlp_grams(model.params["h"][str(l)], self.config, jnp.float32)
                 for l in range(first, self.config.n_layer)}
        self.params = self._global(model.params, self._repl)
        self.grams = self._global(grams, self._repl)

    def _global(self, tree, sharding):
        """Host values (identical on every process) -> global arrays with ``sharding``."""
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.tree_util.tree_map(one, tree)

    def _fn(self, layer: int):
        return _compiled(self.config, layer, self.spec, self.mesh)

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
        out = self._fn(layer)(self.params, self.grams, *args)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:B] for k, v in out.items()}
