"""Interpolation paths between two residual vectors a (alpha=0) and b (alpha=1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PATHS = ("slerp", "linear")


def alpha_grid(n_steps: int) -> np.ndarray:
    """``linspace(0, 1, n_steps)`` as the study used; n_steps >= 2."""
    if int(n_steps) < 2:
        raise ValueError(f"n_steps={n_steps}: need at least 2 steps (the two endpoints).")
    return np.linspace(0.0, 1.0, int(n_steps))


def linear(a, b, alpha):
    """``x = a + alpha (b - a)``; a, b ``[..., d]``, alpha ``[n]`` -> ``[..., n, d]``."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    alpha = jnp.asarray(alpha, a.dtype)
    return a[..., None, :] + alpha[:, None] * (b - a)[..., None, :]


def slerp(a, b, alpha, eps: float = 1e-7):
    """Slerp with norm rescaling: the angle moves evenly, the norm linearly.

    With a^ = a/|a|, b^ = b/|b|, theta = arccos(a^.b^) in [0, pi]::

        x(alpha) = [sin((1-alpha) theta) a^ + sin(alpha theta) b^] / sin(theta)
                   * ((1-alpha)|a| + alpha|b|)

    Unlike the study's code, which used arccos(|a^.b^|) and so missed endpoint b whenever the
    angle was obtuse, x(1) = b for every angle. Parallel vectors (sin(theta) ~ 0) fall back to
    the normalised linear path. Antiparallel vectors have no unique great circle: refused by
    returning NaN (callers validate). Shapes: a, b ``[..., d]``, alpha ``[n]`` -> ``[..., n, d]``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    alpha = jnp.asarray(alpha, a.dtype)[:, None]
    na = jnp.linalg.norm(a, axis=-1, keepdims=True)[..., None, :]
    nb = jnp.linalg.norm(b, axis=-1, keepdims=True)[..., None, :]
    ah, bh = a[..., None, :] / na, b[..., None, :] / nb
    cos = jnp.clip(jnp.sum(ah * bh, axis=-1, keepdims=True), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    small = sin < eps
    safe = jnp.where(small, 1.0, sin)
    wa = jnp.where(small, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / safe)
    wb = jnp.where(small, alpha, jnp.sin(alpha * theta) / safe)
    direction = wa * ah + wb * bh
    direction = jnp.where(small, direction / jnp.linalg.norm(direction, axis=-1, keepdims=True),
                          direction)
    return direction * ((1.0 - alpha) * na + alpha * nb)


def interpolate(a, b, alpha, path: str = "slerp"):
    """Dispatches to :func:`slerp` or :func:`linear`; ``[..., d]`` -> ``[..., n, d]``."""
    if path == "slerp":
        return slerp(a, b, alpha)
    if path == "linear":
        return linear(a, b, alpha)
    raise ValueError(f"Unknown path {path!r}; choose one of {PATHS}.")
