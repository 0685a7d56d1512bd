"""2-D slices of the residual stream: a grid over a plane through the rest of the model.

A plane at a residual site is an origin ``o`` and two orthonormal axes ``e1``, ``e2``; grid point
``(s, t)`` is the vector ``o + D (s e1 + t e2)`` with coordinates in units of ``D``, the typical
distance between real activations at the site (:mod:`plateau_jax.plateaus.reference`), so the
picture keeps the true geometry (distances and angles).

* :func:`plane_from_anchors`: the plane through three real activations ``a``, ``b``, ``c``
  (origin ``a``, ``e1`` along ``b - a``, ``e2`` the part of ``c - a`` orthogonal to ``e1``); the
  anchors sit at ``(0, 0)``, ``(|b - a| / D, 0)`` and ``c``'s projection.
* :func:`plane_from_directions`: one activation ``x`` and two directions (``e1`` along ``u1``,
  ``e2`` the part of ``u2`` orthogonal to it); the anchor sits at ``(0, 0)``.

Every grid point enters the model at the site after one shared context (a cache of one
context), in one jitted call (:func:`slice_outputs`, chunked inside with ``lax.map`` so that
only ``chunk`` rows of logits exist at once); per point it returns the argmax next token, the KL
divergence ``KL(p_anchor || p_point)`` (nats) to each anchor's next-token distribution and the
logit distance to each anchor; the study's relative distance ``r = d_0 / (d_0 + d_1)`` between
the first two anchors follows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import core
from plateau_jax.model.core import KVCache
from plateau_jax.model.model import Model
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus.reference import check_site


@dataclasses.dataclass(frozen=True)
class Plane:
    """``origin`` ``[d]``, orthonormal ``e1``, ``e2`` ``[d]`` (float64), ``scale`` D, and the
    anchors: their vectors ``[K, d]`` and plane coordinates ``[K, 2]`` (units of D)."""

    origin: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    scale: float
    anchors: np.ndarray
    anchor_coords: np.ndarray

    def points(self, s, t) -> np.ndarray:
        """Grid vectors ``[len(s), len(t), d]`` (float64): ``origin + D (s_i e1 + t_j e2)``."""
        s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
        return (self.origin + self.scale * (s[:, None, None] * self.e1
                                            + t[None, :, None] * self.e2))


def _check_scale(scale: float) -> float:
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale (the typical distance D) must be > 0; got {scale}.")
    return float(scale)


def _orthonormal(v1, v2, what: str) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """``(e1, e2, |v1|, v2 . e1)`` by Gram-Schmidt; refuses zero-length or parallel vectors."""
    n1 = np.linalg.norm(v1)
    if not n1 > 0:
        raise ValueError(f"{what}: the first axis has zero length.")
    e1 = v1 / n1
    along = float(v2 @ e1)
    rest = v2 - along * e1
    n2 = np.linalg.norm(rest)
    if not n2 > 1e-6 * max(np.linalg.norm(v2), n1):
        raise ValueError(f"{what}: the two axes are parallel (or the second has zero length); "
                         "they span no plane.")
    return e1, rest / n2, float(n1), along


def plane_from_anchors(a, b, c, scale: float) -> Plane:
    """The plane through three real activations ``a``, ``b``, ``c`` ``[d]`` (see the module
    docstring); collinear or coincident anchors are an error."""
    a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
    scale = _check_scale(scale)
    e1, e2, n1, along = _orthonormal(b - a, c - a, "plane through three activations")
    coords = np.array([[0.0, 0.0], [n1, 0.0], [along, float((c - a) @ e2)]]) / scale
    return Plane(a, e1, e2, scale, np.stack([a, b, c]), coords)


def plane_from_directions(x, u1, u2, scale: float) -> Plane:
    """The plane through activation ``x`` spanned by directions ``u1``, ``u2`` ``[d]``."""
    x, u1, u2 = (np.asarray(v, np.float64) for v in (x, u1, u2))
    scale = _check_scale(scale)
    e1, e2, _, _ = _orthonormal(u1, u2, "plane through an activation and two directions")
    return Plane(x, e1, e2, scale, x[None], np.zeros((1, 2)))


def grid_axis(lo: float, hi: float, n: int) -> np.ndarray:
    """``linspace(lo, hi, n)``; refuses ``n < 1`` (a grid of size 0) and ``hi <= lo``."""
    if int(n) < 1:
        raise ValueError(f"a slice grid needs at least 1 point per axis; got {n}.")
    if not hi > lo:
        raise ValueError(f"a slice grid axis needs lo < hi; got [{lo}, {hi}].")
    return np.linspace(float(lo), float(hi), int(n))


def default_extent(plane: Plane, margin: float = 0.5) -> Tuple[Tuple[float, float], ...]:
    """``((s_lo, s_hi), (t_lo, t_hi))``: the anchors' bounding box widened by ``margin`` D
    (at least ``margin`` on each side of a single anchor)."""
    lo = plane.anchor_coords.min(axis=0) - margin
    hi = plane.anchor_coords.max(axis=0) + margin
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def slice_outputs(params, cfg, cache: KVCache, points, anchor_logits, entry, chunk: int = 512):
    """Outputs at ``points`` ``[N, d]`` (one context ``cache``), ``chunk`` rows at a time.

    Returns ``top`` ``[N]`` (argmax token), ``kl`` ``[K, N]`` (``KL(p_k || p)``, nats, to each of
    the ``K`` anchors' logits ``[K, V]``) and ``dist`` ``[K, N]`` (logit distance). Pure."""
    N, d = points.shape
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    rows = jnp.concatenate([points, jnp.repeat(points[-1:], pad, 0)]) if pad else points
    dtype = params["embed"]["W_E"].dtype
    lpa = metrics.log_softmax(anchor_logits.astype(jnp.float32))  # [K, V]

    def one(x):  # [chunk, d]
        logits, _ = core.continue_from(params, cfg, cache, x[None].astype(dtype), entry)
        z = logits[0].astype(jnp.float32)
        kl = metrics.kl_from_log_probs(lpa[:, None], metrics.log_softmax(z)[None])
        dist = jnp.linalg.norm(z[None] - anchor_logits.astype(jnp.float32)[:, None], axis=-1)
        return jnp.argmax(z, axis=-1).astype(jnp.int32), kl, dist

    top, kl, dist = jax.lax.map(one, rows.reshape(n_chunks, chunk, d))
    K = anchor_logits.shape[0]
    per_anchor = lambda a: jnp.moveaxis(a, 0, 1).reshape(K, -1)[:, :N]  # [chunks, K, c] -> [K, N]
    return top.reshape(-1)[:N], per_anchor(kl), per_anchor(dist)


@functools.partial(jax.jit, static_argnames=("cfg", "precision", "chunk"))
def _slice_jit(params, cache, points, anchors, entry, cfg, precision, chunk):
    with jax.default_matmul_precision(precision):
        dtype = params["embed"]["W_E"].dtype
        anchor_logits, _ = core.continue_from(params, cfg, cache, anchors[None].astype(dtype), entry)
        top, kl, dist = slice_outputs(params, cfg, cache, points, anchor_logits[0], entry, chunk)
        return top, kl, dist, anchor_logits[0]


@dataclasses.dataclass(frozen=True)
class Slice:
    """A computed slice: ``s`` ``[Gs]``, ``t`` ``[Gt]`` (units of D), ``top`` ``[Gs, Gt]``,
    ``kl`` / ``dist`` ``[K, Gs, Gt]`` (nats / logit units, to each anchor), ``anchor_top``
    ``[K]``, and the :class:`Plane`."""

    plane: Plane
    layer: int
    site: str
    s: np.ndarray
    t: np.ndarray
    top: np.ndarray
    kl: np.ndarray
    dist: np.ndarray
    anchor_top: np.ndarray

    def rel_distance(self) -> np.ndarray:
        """``[Gs, Gt]``: ``d_0 / (d_0 + d_1)`` of the logits between anchors 0 and 1 (0 at
        anchor 0, 1 at anchor 1); needs two anchors."""
        if self.dist.shape[0] < 2:
            raise ValueError("the relative distance needs two anchors; this slice has one.")
        return metrics.relative_from_distances(self.dist[0], self.dist[1])


def compute_slice(model: Model, cache: KVCache, plane: Plane, layer: int, site: str,
                  s: Sequence[float], t: Sequence[float], chunk: int = 512) -> Slice:
    """Runs every grid point of ``plane`` (coordinates ``s`` x ``t``, units of D) from
    ``blocks.{layer}.hook_{site}`` on, after the context of ``cache`` (one context), in one
    jitted call."""
    entry = check_site(model, layer, site)
    if cache.batch != 1:
        raise ValueError(f"a slice continues one context; the cache holds {cache.batch}.")
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.ndim != 1 or t.ndim != 1 or not s.size or not t.size:
        raise ValueError(f"slice coordinates must be non-empty 1-D grids; got {s.shape}, "
                         f"{t.shape}.")
    pts = plane.points(s, t).reshape(-1, plane.origin.shape[0])
    chunk = int(max(1, min(chunk, pts.shape[0])))
    top, kl, dist, anchor_logits = _slice_jit(
        model.params, cache, jnp.asarray(pts, jnp.float32), jnp.asarray(plane.anchors, jnp.float32),
        jnp.asarray(entry, jnp.int32), model.config, model.matmul_precision, chunk)
    anchor_top = np.argmax(np.asarray(anchor_logits), axis=-1)
    G = (s.size, t.size)
    K = plane.anchors.shape[0]
    return Slice(plane, layer, site, s, t, np.asarray(top).reshape(G),
                 np.asarray(kl).reshape((K,) + G), np.asarray(dist).reshape((K,) + G),
                 np.asarray(anchor_top))
