"""Perturbation directions from real activations, and the model's batched response to them.

A *base point* ``x`` is a real activation: ``blocks.{layer}.hook_{site}`` (a residual site) at the
last position of a prompt. A perturbation moves it to ``x + t D u`` with ``u`` a unit direction,
``t`` the step length *in units of* ``D``, the typical distance between real activations at that
site (:attr:`plateau_jax.plateaus.reference.Reference.typical_distance`: the median distance
between two reference activations). The perturbed vector enters the model at that site, the
prompt's earlier positions unchanged (their keys and values are computed once), and the rest of
the model runs on it. ``t = 0`` is the unperturbed output.

Direction types (every generator returns unit vectors ``[B, n, d]``; ``B`` base points):

* ``real``: towards another prompt's activation, ``u = (x_j - x) / |x_j - x|`` (``j`` drawn
  without replacement among the other base points). The study's linear interpolation from
  ``x`` to ``x_j`` is the special case ``t D = |x_j - x|``.
* ``random``: isotropic, ``u = z / |z|``, ``z ~ N(0, I)``.
* ``matched``: towards a random point ``y ~ N(mean, cov)`` of the reference set (same first two
  moments as real activations), ``u = (y - x) / |y - x|``. This is the baseline of Heimersheim
  (2024) that Lee & Heimersheim (2024) showed to be flawed: it subtracts the original ``x``, so
  it always contains a component that shrinks the activation towards the mean.
* Lee & Heimersheim's improved ("cov-random mixture") baseline does not use ``x``. Their
  write-up names it without a formula we could check, so two readings are implemented:
  ``cov_diff``: ``u = (y1 - y2) / |y1 - y2|``, two independent samples of ``N(mean, cov)``
  (a direction distributed as ``N(0, cov)``, normalised); ``cov_sample``: ``u = y / |y|``,
  towards a covariance-matched sample without subtracting ``x``.
* ``mixture``: ``u = (u_a + u_b) / |u_a + u_b|`` of two ``real`` directions of the same base
  point (mixture ``j`` mixes real directions ``2j`` and ``2j + 1``), to compare against each pure
  direction (arXiv 2606.24964's pure contrastive directions against mixtures of two).
* ``sensitive``: the direction maximising the output change at a fixed length ``t D`` on the
  unit sphere, by projected gradient ascent with optax (:func:`sensitive_search`).
* ``steering``: ``u = (mean_A - mean_B) / |mean_A - mean_B|``, the difference of the means of
  two prompt sets' activations (a concept and its opposite); its natural length
  ``|mean_A - mean_B| / D`` is reported.

Responses (:func:`response`, :func:`perturbation_responses`): for every base point, direction and
step length, ``KL(p(x) || p(x + t D u))`` of the next-token distribution (nats) and, at every
layer's ``resid_post`` (NaN for layers not downstream of the site) and the logits, the distances
``|y(t) - y(0)|`` and ``|y(t) - y(t_max)|``, from which the relative distance
``r = |y(t) - y(0)| / (|y(t) - y(0)| + |y(t) - y(t_max)|)`` (the study's, with ``t_max`` as the
far endpoint) and its sharpness ``S`` over the normalised length ``t / t_max`` follow. The
*activation threshold* is the step length ``t`` at which the KL first reaches a threshold
(linear interpolation between grid points; NaN when it never does).

Everything at the core level (:func:`response`, :func:`sensitive_search`, the generators) is pure
and composes with ``jit``, ``vmap`` and ``grad``; the entry point is a runtime value (one
compiled program serves every layer and site). The drivers batch and shard over base points
like the sweep (a 1-D mesh, ``shard_map``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from plateau_jax import files
from plateau_jax.model import core
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.model import Model
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus.reference import batch_rows, check_site, pad_prompts, sharded
from plateau_jax.sharding import make_mesh

DIRECTION_TYPES = ("real", "random", "matched", "cov_diff", "cov_sample", "mixture", "sensitive",
                   "steering")
OBJECTIVES = ("kl", "distance")


# ----------------------------------------------------------------------------- validation

def unit(v, axis: int = -1):
    """``v / |v|`` along ``axis`` (zero vectors give NaN: validate with :func:`check_directions`)."""
    return v / jnp.linalg.norm(v, axis=axis, keepdims=True)


def check_directions(directions, what: str = "directions") -> np.ndarray:
    """Host check: ``[B, M, d]``, finite, every vector of non-zero length. Returns them
    normalised (float32)."""
    u = np.asarray(directions, np.float64)
    if u.ndim != 3 or 0 in u.shape:
        raise ValueError(f"{what} must have shape [B, M, d] with B, M, d >= 1; got {u.shape}.")
    norms = np.linalg.norm(u, axis=-1)
    if not np.all(np.isfinite(u)):
        raise ValueError(f"{what} contain NaN or Inf.")
    bad = np.argwhere(norms <= 1e-12 * max(1.0, float(norms.max())))
    if bad.size:
        raise ValueError(f"{what} {[tuple(b) for b in bad[:5].tolist()]} (base, direction) have "
                         "zero length: a direction needs a non-zero vector (is a target equal to "
                         "its base point?).")
    return (u / norms[..., None]).astype(np.float32)


def check_lengths(lengths) -> np.ndarray:
    """Step lengths ``[T]`` in units of D: 1-D, >= 2 values, finite, from exactly 0 (the
    unperturbed output), strictly increasing."""
    t = np.asarray(lengths, np.float64)
    if t.ndim != 1 or t.size < 2 or not np.all(np.isfinite(t)):
        raise ValueError(f"step lengths must be a finite 1-D grid of at least 2 values; got {t!r}.")
    if t[0] != 0.0 or np.any(np.diff(t) <= 0):
        raise ValueError("step lengths must start at 0 (the unperturbed output) and increase "
                         f"strictly; got {t.tolist()}.")
    return t


def length_grid(max_length: float, n: int) -> np.ndarray:
    """``linspace(0, max_length, n)`` in units of D (validated)."""
    if n < 2 or not max_length > 0:
        raise ValueError(f"a length grid needs n >= 2 and max_length > 0; got n={n}, "
                         f"max_length={max_length}.")
    return np.linspace(0.0, float(max_length), int(n))


def check_prompts(prompts, what: str = "base prompts") -> None:
    for i, p in enumerate(prompts):
        if len(p) < 2:
            raise ValueError(f"{what}: prompt {i} has {len(p)} token(s); a base point needs at "
                             "least 2 (the perturbed last token continues the earlier ones).")


# ----------------------------------------------------------------------------- generators

def random_directions(key, batch: int, n: int, d: int, dtype=jnp.float32):
    """Isotropic unit directions ``[batch, n, d]``."""
    return unit(jax.random.normal(key, (batch, n, d), dtype))


def real_directions(key, base, targets, n: int, base_index=None):
    """Unit directions from each base point towards ``n`` other real activations.

    Args:
      base: ``[B, d]``; targets: ``[P, d]`` real activations.
      base_index: ``[B]`` int, row of each base point in ``targets`` (excluded from its own
        draws), or None when the base points are not among the targets.

    Returns:
      ``(directions [B, n, d], target indices [B, n])``; indices are drawn without replacement.
    """
    P = targets.shape[0]
    B = base.shape[0]
    pool = P - (0 if base_index is None else 1)
    if n > pool:
        raise ValueError(f"{n} real directions per base point need at least {n} other "
                         f"activations; there are {pool}.")
    keys = jax.random.split(key, B)
    idx = jax.vmap(lambda k: jax.random.permutation(k, pool)[:n])(keys)
    if base_index is not None:
        idx = idx + (idx >= jnp.asarray(base_index)[:, None])
    return unit(targets[idx] - base[:, None, :]), idx


def gaussian_samples(key, mean, factor, shape: Tuple[int, ...]):
    """``mean + F z``, ``z ~ N(0, I)``: samples ``shape + (d,)`` with mean ``mean`` and
    covariance ``F F^T`` (``F`` from :meth:`Reference.gaussian_factor`)."""
    z = jax.random.normal(key, tuple(shape) + (factor.shape[1],), factor.dtype)
    return mean + z @ factor.T


def matched_directions(key, base, mean, factor, n: int):
    """``unit(y - x)``, ``y ~ N(mean, cov)`` (Heimersheim 2024's baseline; subtracts x)."""
    y = gaussian_samples(key, mean, factor, (base.shape[0], n))
    return unit(y - base[:, None, :])


def cov_diff_directions(key, mean, factor, batch: int, n: int):
    """``unit(y1 - y2)``, two independent ``N(mean, cov)`` samples (does not use x)."""
    k1, k2 = jax.random.split(key)
    return unit(gaussian_samples(k1, mean, factor, (batch, n))
                - gaussian_samples(k2, mean, factor, (batch, n)))


def cov_sample_directions(key, mean, factor, batch: int, n: int):
    """``unit(y)``, ``y ~ N(mean, cov)`` (does not use x)."""
    return unit(gaussian_samples(key, mean, factor, (batch, n)))


def mixture_directions(pure):
    """``unit(pure[:, 2j] + pure[:, 2j + 1])``: ``[B, 2m, d] -> [B, m, d]``."""
    if pure.shape[1] % 2:
        raise ValueError(f"mixtures pair consecutive directions; got an odd number "
                         f"({pure.shape[1]}).")
    return unit(pure[:, 0::2] + pure[:, 1::2])


def steering_direction(acts_a, acts_b) -> Tuple[np.ndarray, float]:
    """``(unit(mean_A - mean_B) [d], |mean_A - mean_B|)`` of two sets of activations (float64)."""
    a, b = np.asarray(acts_a, np.float64), np.asarray(acts_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) < 1 or len(b) < 1:
        raise ValueError("steering needs at least one activation in each prompt set.")
    v = a.mean(axis=0) - b.mean(axis=0)
    norm = float(np.linalg.norm(v))
    if not norm > 0:
        raise ValueError("the two steering prompt sets have the same mean activation: the "
                         "steering direction has zero length.")
    return v / norm, norm


# ----------------------------------------------------------------------------- responses

def perturbed(base, directions, steps):
    """``x + s u`` rows: base ``[B, d]``, directions ``[B, M, d]``, steps ``[T]`` (residual
    units) -> ``[B, M, T, d]``."""
    return base[:, None, None, :] + steps[None, None, :, None] * directions[:, :, None, :]


def response(params, cfg, cache, base, directions, steps, entry) -> Dict[str, jax.Array]:
    """The model's response to ``x + s u`` for every base point, direction and step.

    Args:
      cache: a :class:`~plateau_jax.model.core.KVCache` of ``B`` contexts (each base point's
        prompt without its last token).
      base: ``[B, d]`` the entry-site activations; directions: ``[B, M, d]`` unit vectors;
      steps: ``[T]`` absolute step lengths (residual units), ``steps[0] == 0``.
      entry: runtime entry index (:func:`plateau_jax.model.sites.entry_index`).

    Returns:
      ``kl`` ``[B, M, T]`` (nats, ``KL(p(x) || p(x + s u))``), ``dist`` / ``dist_end``
      ``[B, M, T, L]`` (``|y(s) - y(0)|``, ``|y(s) - y(s_max)|`` of each layer's resid_post; NaN
      for layers before the first block that runs), ``logit_dist`` / ``logit_dist_end`` ``[B, M, T]`` (same for the
      logits), ``top`` ``[B, M, T]`` (argmax next token).
    """
    B, M, d = directions.shape
    T = steps.shape[0]
    L = cfg.n_layer
    dtype = params["embed"]["W_E"].dtype
    x = perturbed(base.astype(jnp.float32), directions.astype(jnp.float32),
                  steps.astype(jnp.float32))
    iv = core.record_layers({"hook_resid_post": range(L)}, L)
    logits, rec = core.continue_from(params, cfg, cache, x.reshape(B, M * T, d).astype(dtype),
                                     entry, iv)
    logits = logits.astype(jnp.float32).reshape(B, M, T, -1)
    lp = metrics.log_softmax(logits)
    y = rec["hook_resid_post"].astype(jnp.float32).reshape(L, B, M, T, d)
    # Layers before the first block that runs are not downstream: NaN (the resid_post just
    # before a resid_pre entry is the input itself).
    later = (jnp.arange(L) >= sites_lib.first_block(entry))[:, None, None, None]
    per_layer = lambda v: jnp.moveaxis(jnp.where(later, v, jnp.nan), 0, -1)  # [B, M, T, L]
    dist, dist_end = metrics.endpoint_distances(y)
    logit_dist, logit_dist_end = metrics.endpoint_distances(logits)
    return dict(
        kl=metrics.kl_from_log_probs(lp[:, :, :1], lp),
        dist=per_layer(dist),
        dist_end=per_layer(dist_end),
        logit_dist=logit_dist,
        logit_dist_end=logit_dist_end,
        top=jnp.argmax(logits, axis=-1).astype(jnp.int32))


def context_cache(params, cfg, ids, lengths):
    """The cache of each prompt without its last token (``ids`` ``[B, T]`` right-padded, real
    ``lengths`` >= 2): the continuation's next position is the prompt's last."""
    return core.prefix(params, cfg, ids, lengths - 1)


@functools.lru_cache(maxsize=16)
def _response_program(cfg, precision: str, mesh: Mesh):
    def fn(params, entry, steps, ids, lengths, base, directions):
        with jax.default_matmul_precision(precision):
            cache = context_cache(params, cfg, ids, lengths)
            return response(params, cfg, cache, base, directions, steps, entry)
    return sharded(fn, mesh, 3, 4)


@dataclasses.dataclass(frozen=True)
class Responses:
    """Host results of :func:`perturbation_responses` (arrays as :func:`response` returns them,
    as numpy; ``lengths`` ``[T]`` in units of ``scale`` = D)."""

    layer: int
    site: str
    lengths: np.ndarray
    scale: float
    kl: np.ndarray
    dist: np.ndarray
    dist_end: np.ndarray
    logit_dist: np.ndarray
    logit_dist_end: np.ndarray
    top: np.ndarray

    def rel_distance(self) -> np.ndarray:
        """``[B, M, T, L + 1]``: r at every layer's resid_post, then the logits (NaN for layers
        not downstream, and at t = 0 and t_max of a curve whose endpoints coincide)."""
        da = np.concatenate([self.dist, self.logit_dist[..., None]], axis=-1)
        db = np.concatenate([self.dist_end, self.logit_dist_end[..., None]], axis=-1)
        return metrics.relative_from_distances(da, db)

    def sharpness(self) -> np.ndarray:
        """``[B, M, L + 1]``: S of each r curve over the normalised length ``t / t_max`` (1 for
        a straight line), per layer then the logits."""
        r = np.moveaxis(self.rel_distance(), 2, -1)
        return metrics.sharpness(r, self.lengths / self.lengths[-1])

    def thresholds(self, kl_threshold: float) -> np.ndarray:
        """``[B, M]`` activation thresholds in units of D (:func:`activation_threshold`)."""
        return activation_threshold(self.kl, self.lengths, kl_threshold)


def activation_threshold(kl, lengths, threshold: float) -> np.ndarray:
    """The step length at which ``kl`` ``[..., T]`` first reaches ``threshold`` (nats), linearly
    interpolated between the grid points ``lengths`` ``[T]``; NaN where it never does."""
    if not threshold > 0:
        raise ValueError(f"the KL threshold must be > 0 nats; got {threshold}.")
    kl = np.asarray(kl, np.float64)
    t = np.asarray(lengths, np.float64)
    above = kl >= threshold
    k = np.argmax(above, axis=-1)
    hit = np.take_along_axis(above, k[..., None], -1)[..., 0]
    k0 = np.maximum(k - 1, 0)
    y0 = np.take_along_axis(kl, k0[..., None], -1)[..., 0]
    y1 = np.take_along_axis(kl, k[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(k > 0, (threshold - y0) / (y1 - y0), 0.0)
    out = t[k0] + frac * (t[k] - t[k0])
    return np.where(hit, out, np.nan)


def perturbation_responses(model: Model, prompts, base, directions, lengths, layer: int,
                           site: str, scale: float, *, batch_size: int = 8,
                           mesh: Optional[Mesh] = None,
                           progress_desc: Optional[str] = None) -> Responses:
    """The response of every base point to every direction at every step length, batched over
    base points (``batch_size`` per compiled call, sharded over the mesh's devices).

    Args:
      prompts: ``B`` token id arrays (>= 2 tokens each); base point ``b`` is the last
        position of ``prompts[b]`` at ``blocks.{layer}.hook_{site}`` (``base[b]``, e.g. from
        :func:`plateau_jax.plateaus.reference.collect_activations`).
      base: ``[B, d]``; directions: ``[B, M, d]`` (normalised here; zero length is an error).
      lengths: ``[T]`` step lengths in units of ``scale`` (D), from 0.
      scale: D, the typical distance between real activations at the site (> 0).
    """
    entry = check_site(model, layer, site)
    t = check_lengths(lengths)
    u = check_directions(directions)
    base = np.asarray(base, np.float32)
    if base.shape != (u.shape[0], model.config.d_model) or len(prompts) != u.shape[0]:
        raise ValueError(f"base points {base.shape}, directions {u.shape} and {len(prompts)} "
                         "prompts disagree: need base [B, d_model], directions [B, M, d_model] "
                         "and B prompts.")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale (the typical distance D) must be > 0; got {scale}.")
    check_prompts(prompts)
    mesh = mesh or make_mesh()
    ids, plen = pad_prompts(prompts)
    fn = _response_program(model.config, model.matmul_precision, mesh)
    steps = jnp.asarray(t * scale, jnp.float32)
    entry = jnp.asarray(entry, jnp.int32)
    parts = []
    chunks = batch_rows([ids, plen, base, u], batch_size, mesh.devices.size)
    if progress_desc:
        chunks = files.progress(chunks, progress_desc, total=-(-len(prompts) // batch_size))
    for start, stop, chunk in chunks:
        out = fn(model.params, entry, steps, *chunk)
        parts.append({k: np.asarray(v)[: stop - start] for k, v in out.items()})
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Responses(layer=layer, site=site, lengths=t, scale=float(scale), **cat)


# ----------------------------------------------------------------------------- sensitive

def sensitive_search(params, cfg, cache, base, init, radius, entry, *, steps: int,
                     optimizer: optax.GradientTransformation, objective: str = "kl",
                     target_layer=0):
    """Projected gradient ascent on the unit sphere for the directions that change the output
    most at a fixed perturbation length.

    For each base point ``b`` and restart ``r`` (rows of one batched continuation: rows are
    independent, so this is the vmap over base points and restarts), maximises
    ``f(u) = KL(p(x) || p(x + radius u))`` (``objective="kl"``, nats) or
    ``|y(x + radius u) - y(x)|`` with ``y`` the resid_post of ``target_layer`` (a runtime value;
    ``objective="distance"``). Each iteration (a ``lax.scan``): the gradient is projected on the
    sphere's tangent space (``g - (g . u) u``), the optax update of the negated objective is
    applied, and ``u`` is renormalised (the projection back onto the sphere).

    Args:
      cache: ``B`` contexts; base: ``[B, d]``; init: ``[B, R, d]`` unit starting directions;
      radius: absolute perturbation length (residual units); entry: runtime entry index.

    Returns:
      ``(directions [B, R, d], objective [B, R] at them, trace [steps, B, R])``, the trace
      holding the objective before each update.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}.")
    L = cfg.n_layer
    dtype = params["embed"]["W_E"].dtype
    iv = (core.record_layers({"hook_resid_post": range(L)}, L) if objective == "distance"
          else core.NONE)
    base = base.astype(jnp.float32)

    def run(x):
        logits, rec = core.continue_from(params, cfg, cache, x.astype(dtype), entry, iv)
        y = (jax.lax.dynamic_index_in_dim(rec["hook_resid_post"], target_layer, 0,
                                          keepdims=False).astype(jnp.float32)
             if objective == "distance" else None)
        return metrics.log_softmax(logits.astype(jnp.float32)), y

    lp0, y0 = jax.lax.stop_gradient(run(base[:, None, :]))

    def values(u):
        lp, y = run(base[:, None, :] + radius * u)
        if objective == "kl":
            return metrics.kl_from_log_probs(lp0, lp)
        return jnp.linalg.norm(y - y0, axis=-1)

    def total(u):
        v = values(u)
        return jnp.sum(v), v

    def step(carry, _):
        u, state = carry
        (_, v), g = jax.value_and_grad(total, has_aux=True)(u)
        g = g - jnp.sum(g * u, axis=-1, keepdims=True) * u
        updates, state = optimizer.update(-g, state, u)
        return (unit(optax.apply_updates(u, updates)), state), v

    u0 = unit(init.astype(jnp.float32))
    (u, _), trace = jax.lax.scan(step, (u0, optimizer.init(u0)), None, length=steps)
    return u, values(u), trace


@functools.lru_cache(maxsize=16)
def _sensitive_program(cfg, precision: str, mesh: Mesh, steps: int, learning_rate: float,
                       objective: str):
    opt = optax.adam(learning_rate)

    def fn(params, entry, radius, target_layer, ids, lengths, base, init):
        with jax.default_matmul_precision(precision):
            cache = context_cache(params, cfg, ids, lengths)
            u, val, trace = sensitive_search(params, cfg, cache, base, init, radius, entry,
                                             steps=steps, optimizer=opt, objective=objective,
                                             target_layer=target_layer)
            return u, val, jnp.moveaxis(trace, 0, -1)  # [B, R, steps]: batch-leading
    return sharded(fn, mesh, 4, 4)


@dataclasses.dataclass(frozen=True)
class SensitiveResult:
    """``directions`` ``[B, R, d]`` (restarts sorted best first), ``objective`` ``[B, R]``,
    ``trace`` ``[B, R, steps]`` (objective before each update), ``length`` (units of D),
    ``objective_name`` ("kl": nats; "distance": residual units at ``target_layer``)."""

    directions: np.ndarray
    objective: np.ndarray
    trace: np.ndarray
    length: float
    objective_name: str
    target_layer: int

    @property
    def best(self) -> np.ndarray:
        """``[B, 1, d]``: the best restart of each base point."""
        return self.directions[:, :1]


def find_sensitive_directions(model: Model, prompts, base, layer: int, site: str, scale: float,
                              *, length: float, restarts: int = 4, steps: int = 100,
                              learning_rate: float = 0.05, objective: str = "kl",
                              target_layer: Optional[int] = None, seed: int = 0,
                              init=None, batch_size: int = 64, mesh: Optional[Mesh] = None,
                              progress_desc: Optional[str] = None) -> SensitiveResult:
    """Runs :func:`sensitive_search` for every base point (``batch_size`` base points x
    ``restarts`` in one jitted optimisation; by default all 64 of a typical run at once).

    Args:
      length: the fixed perturbation length in units of ``scale`` (D).
      objective: "kl" or "distance" (at ``target_layer``'s resid_post, default the last layer).
      init: ``[B, restarts, d]`` starting directions (default: isotropic random, from ``seed``).
    """
    entry = check_site(model, layer, site)
    cfg = model.config
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}.")
    if restarts < 1 or steps < 1 or not learning_rate > 0 or not length > 0:
        raise ValueError("the sensitive search needs restarts >= 1, steps >= 1, "
                         f"learning_rate > 0 and length > 0; got {restarts}, {steps}, "
                         f"{learning_rate}, {length}.")
    target_layer = cfg.n_layer - 1 if target_layer is None else int(target_layer)
    if objective == "distance":
        first = sites_lib.first_layer_after(layer, site)
        if not first <= target_layer < cfg.n_layer:
            raise ValueError(f"target layer {target_layer} is not downstream of "
                             f"blocks.{layer}.hook_{site}: choose {first}..{cfg.n_layer - 1}.")
    check_prompts(prompts)
    base = np.asarray(base, np.float32)
    B = len(prompts)
    if init is None:
        init = np.asarray(random_directions(jax.random.PRNGKey(seed), B, restarts, cfg.d_model))
    init = check_directions(init, "initial directions")
    mesh = mesh or make_mesh()
    ids, plen = pad_prompts(prompts)
    fn = _sensitive_program(cfg, model.matmul_precision, mesh, int(steps), float(learning_rate),
                            objective)
    args = (model.params, jnp.asarray(entry, jnp.int32), jnp.float32(length * scale),
            jnp.asarray(target_layer, jnp.int32))
    parts = []
    chunks = batch_rows([ids, plen, base, init], batch_size, mesh.devices.size)
    if progress_desc:
        chunks = files.progress(chunks, progress_desc, total=-(-B // batch_size))
    for start, stop, chunk in chunks:
        parts.append([np.asarray(v)[: stop - start] for v in fn(*args, *chunk)])
    u, val, trace = (np.concatenate([p[i] for p in parts]) for i in range(3))
    order = np.argsort(-val, axis=1)
    take = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1)
    return SensitiveResult(take(u), take(val), take(trace), float(length), objective,
                           target_layer)


# ----------------------------------------------------------------------------- summaries

def quantiles(x, axis=None) -> Dict[str, np.ndarray]:
    """``{"median", "q25", "q75"}`` ignoring NaN (NaN where everything is NaN)."""
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanpercentile(x, [25, 50, 75], axis=axis)
    return {"q25": q[0], "median": q[1], "q75": q[2]}


def summarize(responses: Responses, type_of: Sequence[str], kl_threshold: float,
              types: Sequence[str]) -> Dict[str, Dict[str, np.ndarray]]:
    """Per direction type (``type_of[m]`` names the type of direction column ``m``): medians and
    quartiles over base points x directions of the KL curve (``[T]``), the activation
    threshold, the sharpness of the logits' r, and the fraction of curves that never reach the
    threshold."""
    type_of = np.asarray(type_of)
    thr = responses.thresholds(kl_threshold)
    sharp = responses.sharpness()[..., -1]
    out = {}
    for name in types:
        cols = np.nonzero(type_of == name)[0]
        if not cols.size:
            continue
        kl = responses.kl[:, cols].reshape(-1, responses.kl.shape[-1])
        t = thr[:, cols].ravel()
        out[name] = {"kl": quantiles(kl, axis=0), "threshold": quantiles(t),
                     "sharpness": quantiles(sharp[:, cols].ravel()),
                     "never": np.float64(np.mean(np.isnan(t))), "n": np.int64(t.size)}
    return out
