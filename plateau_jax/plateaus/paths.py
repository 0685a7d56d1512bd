"""Interpolation paths between two residual vectors a (alpha=0) and b (alpha=1).

One formula per path (:func:`_slerp_formula`, ...), run two ways:

* :func:`interpolate_host` (numpy, float64, on the host): what the plateau and Jacobian scripts
  and :func:`plateau_jax.plateaus.interpolation.interpolation_run` use. The path is computed in
  float64 and only then cast to the model's dtype, so every caller feeds the same vectors and the
  alpha grid is exact to the dtype's rounding of the result. Antiparallel endpoints raise
  :class:`AntiparallelError`.
* :func:`interpolate` (JAX, traceable, in the inputs' dtype): for code that builds paths inside a
  jitted program (the sweep engine). Its slerp measures the angle stably
  (``2 atan2(|a^ - b^|, |a^ + b^|)``, accurate in float32 near 0 and near pi, unlike
  ``arccos`` of a clipped cosine) and returns NaN for antiparallel endpoints, which callers
  report (the sweep marks the pair failed, naming the angle and the tolerance).

Antiparallel means an angle within :data:`ANTIPARALLEL_TOL` radians of pi: two opposite vectors
have no unique great circle between them, and near-opposite ones have a great circle fixed by
their small non-opposite part, which float32 activations do not carry accurately.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

PATHS = ("slerp", "linear")
# slerp refuses endpoints whose angle is within this many radians of pi (0.0573 degrees).
ANTIPARALLEL_TOL = 1e-3
# Below this angle (radians) slerp uses the normalised linear blend of the unit vectors, which
# equals the slerp direction to O(theta^2).
_PARALLEL_ANGLE = 1e-6


class AntiparallelError(ValueError):
    """slerp between (nearly) antiparallel endpoints, which has no well-defined great circle."""


def alpha_grid(n_steps: int) -> np.ndarray:
    """``linspace(0, 1, n_steps)`` as the study used; n_steps >= 2."""
    if int(n_steps) < 2:
        raise ValueError(f"n_steps={n_steps}: need at least 2 steps (the two endpoints).")
    return np.linspace(0.0, 1.0, int(n_steps))


# One formula per path, for numpy (the host, float64) and jax.numpy (traceable) alike: ``xp``.

def _linear(xp, a, b, alpha):
    return a[..., None, :] + alpha[:, None] * (b - a)[..., None, :]


def _unit_angle(xp, ah, bh, keepdims: bool = False):
    """``2 atan2(|a^ - b^|, |a^ + b^|)`` of unit vectors over the last axis."""
    norm = lambda v: xp.linalg.norm(v, axis=-1, keepdims=keepdims)
    return 2.0 * xp.arctan2(norm(ah - bh), norm(ah + bh))


def _angle(xp, a, b):
    return _unit_angle(xp, a / xp.linalg.norm(a, axis=-1, keepdims=True),
                       b / xp.linalg.norm(b, axis=-1, keepdims=True))


def _slerp_formula(xp, ah, bh, na, nb, theta, alpha, eps: float):
    """The slerp with norm rescaling from unit vectors ``ah``, ``bh`` ``[..., 1, d]``, norms
    ``na``, ``nb`` and angle ``theta`` ``[..., 1, 1]``, alpha ``[n, 1]`` -> ``[..., n, d]``;
    below ``eps`` radians the normalised linear blend of the unit vectors."""
    small = theta < eps
    safe = xp.where(small, 1.0, xp.sin(theta))
    wa = xp.where(small, 1.0 - alpha, xp.sin((1.0 - alpha) * theta) / safe)
    wb = xp.where(small, alpha, xp.sin(alpha * theta) / safe)
    direction = wa * ah + wb * bh
    direction = xp.where(small, direction / xp.linalg.norm(direction, axis=-1, keepdims=True),
                         direction)
    return direction * ((1.0 - alpha) * na + alpha * nb)


def linear(a, b, alpha):
    """``x = a + alpha (b - a)``; a, b ``[..., d]``, alpha ``[n]`` -> ``[..., n, d]``."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return _linear(jnp, a, b, jnp.asarray(alpha, a.dtype))


def angle(a, b):
    """Angle between ``a`` and ``b`` ``[..., d] -> [...]`` in radians, ``2 atan2(|a^-b^|, |a^+b^|)``
    (JAX, traceable): accurate over the whole range [0, pi], also in float32."""
    return _angle(jnp, jnp.asarray(a), jnp.asarray(b))


def slerp(a, b, alpha, eps: float = _PARALLEL_ANGLE, tol: float = ANTIPARALLEL_TOL):
    """Slerp with norm rescaling (JAX, in the inputs' dtype): the angle moves evenly, the norm
    linearly.

    With a^ = a/|a|, b^ = b/|b| and theta their angle in [0, pi]::

        x(alpha) = [sin((1-alpha) theta) a^ + sin(alpha theta) b^] / sin(theta)
                   * ((1-alpha)|a| + alpha|b|)

    Unlike the study's code, which used arccos(|a^.b^|) and so missed endpoint b whenever the
    angle was obtuse, x(1) = b for every angle. theta = 2 atan2(|a^ - b^|, |a^ + b^|).
    Parallel vectors (theta < ``eps``) use the normalised linear blend of a^ and b^. Antiparallel
    vectors (theta > pi - ``tol``) have no unique great circle: the result is NaN (callers check;
    :func:`interpolate_host` raises instead). Shapes: a, b ``[..., d]``, alpha ``[n]`` ->
    ``[..., n, d]``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    alpha = jnp.asarray(alpha, a.dtype)[:, None]
    na = jnp.linalg.norm(a, axis=-1, keepdims=True)[..., None, :]
    nb = jnp.linalg.norm(b, axis=-1, keepdims=True)[..., None, :]
    ah, bh = a[..., None, :] / na, b[..., None, :] / nb
    theta = _unit_angle(jnp, ah, bh, keepdims=True)
    x = _slerp_formula(jnp, ah, bh, na, nb, theta, alpha, eps)
    return jnp.where(theta > math.pi - tol, jnp.nan, x)


def interpolate(a, b, alpha, path: str = "slerp"):
    """Dispatches to :func:`slerp` or :func:`linear` (JAX); ``[..., d]`` -> ``[..., n, d]``."""
    if path == "slerp":
        return slerp(a, b, alpha)
    if path == "linear":
        return linear(a, b, alpha)
    raise ValueError(f"Unknown path {path!r}; choose one of {PATHS}.")


# ----------------------------------------------------------------------------- host, float64

def angle_host(a, b) -> np.ndarray:
    """:func:`angle` in numpy float64."""
    return _angle(np, np.asarray(a, np.float64), np.asarray(b, np.float64))


def _first(mask) -> "tuple | None":
    """Index of the first True entry of ``mask`` (any shape, 0-d included), or None."""
    flat = np.flatnonzero(np.asarray(mask))
    return np.unravel_index(flat[0], np.shape(mask)) if flat.size else None


def _where(index) -> str:
    if not index:
        return ""
    return f" (pair {int(index[0]) if len(index) == 1 else tuple(int(i) for i in index)})"


def slerp_host(a, b, alpha, tol: float = ANTIPARALLEL_TOL) -> np.ndarray:
    """:func:`slerp` in numpy float64; raises :class:`AntiparallelError` for an angle within
    ``tol`` radians of pi and ``ValueError`` for a zero endpoint."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    alpha = np.asarray(alpha, np.float64)[:, None]
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    for name, n in (("A", na), ("B", nb)):
        zero = _first(n[..., 0] == 0)
        if zero is not None:
            raise ValueError(f"endpoint {name}{_where(zero)} is the zero vector: "
                             "slerp needs a direction; use --path=linear.")
    theta = angle_host(a, b)[..., None]
    bad = _first(theta[..., 0] > math.pi - tol)
    if bad is not None:
        t = float(theta[..., 0][bad])
        raise AntiparallelError(
            f"the endpoints{_where(bad)} are {math.degrees(t):.4f} degrees apart, "
            f"within {tol:g} rad ({math.degrees(tol):.3g} degrees) of antiparallel: slerp has no "
            "well-defined great circle there. Use --path=linear (or other endpoints).")
    ah, bh = (a / na)[..., None, :], (b / nb)[..., None, :]
    return _slerp_formula(np, ah, bh, na[..., None, :], nb[..., None, :], theta[..., None, :],
                          alpha, _PARALLEL_ANGLE)


def interpolate_host(a, b, alpha, path: str = "slerp", dtype=None) -> np.ndarray:
    """The path computed in float64 with numpy, then cast to ``dtype`` (default: float64).

    ``a``, ``b`` ``[..., d]`` (any array type), ``alpha`` ``[n]`` -> ``[..., n, d]``. Use this
    wherever the endpoints are on the host anyway: every caller casting to the same dtype gets
    bit-identical vectors. Raises :class:`AntiparallelError` (slerp) as :func:`slerp_host`.
    """
    if path == "slerp":
        x = slerp_host(a, b, alpha)
    elif path == "linear":
        x = _linear(np, np.asarray(a, np.float64), np.asarray(b, np.float64),
                    np.asarray(alpha, np.float64))
    else:
        raise ValueError(f"Unknown path {path!r}; choose one of {PATHS}.")
    return x if dtype is None else x.astype(dtype)
