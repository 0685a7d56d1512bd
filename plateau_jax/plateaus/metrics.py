"""Plateau metrics on interpolation curves: pure numpy, vectorised over leading axes.

Conventions: ``y`` is any recorded vector as a function of the interpolation parameter,
shaped ``[..., n_steps, d]`` (leading axes are pairs, layers, ... in any number); step ``k``
sits at ``alpha[k]``, step 0 is endpoint A (alpha = 0) and step ``n_steps - 1`` endpoint B
(alpha = 1). Every function computes in float64 and returns numpy arrays; norms are Euclidean
over the last axis, in the units of ``y``.
"""

from __future__ import annotations

import numpy as np


def _as_curve(y, name: str = "y") -> np.ndarray:
    y = np.asarray(y, np.float64)
    if y.ndim < 2 or y.shape[-2] < 2:
        raise ValueError(f"{name} must have shape [..., n_steps, d] with n_steps >= 2; "
                         f"got {y.shape}.")
    return y


def _ratio(num, den):
    """num / den elementwise; NaN where both are 0, inf where only den is 0."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def relative_distance(y) -> np.ndarray:
    """Relative distance of each step to the two endpoints, ``[..., n_steps, d] -> [..., n_steps]``.

    ``r_k = |y_k - y_0| / (|y_k - y_0| + |y_k - y_{n-1}|)``: exactly 0 at A and 1 at B (when
    ``y_0 != y_{n-1}``); a plateau is a flat stretch, a boundary a jump. NaN where ``y_k``
    equals both endpoints (e.g. a frozen component).
    """
    y = _as_curve(y)
    da = np.linalg.norm(y - y[..., :1, :], axis=-1)
    db = np.linalg.norm(y - y[..., -1:, :], axis=-1)
    return _ratio(da, da + db)


def distance_curve(y) -> np.ndarray:
    """``d_k / d_{n-1}`` with ``d_k = |y_k - y_0|`` (the "stable regions" curve), ``-> [..., n_steps]``.

    0 at A and 1 at B; unlike :func:`relative_distance` it can exceed 1 (overshoot).
    """
    y = _as_curve(y)
    d = np.linalg.norm(y - y[..., :1, :], axis=-1)
    return _ratio(d, d[..., -1:])


def step_sizes(y) -> np.ndarray:
    """``s_k = |y_{k+1} - y_k|``, ``[..., n_steps, d] -> [..., n_steps - 1]`` (units of y)."""
    y = _as_curve(y)
    return np.linalg.norm(np.diff(y, axis=-2), axis=-1)


def spline_codes(mlp_pre) -> np.ndarray:
    """Spline code of an MLP: ``c = [mlp_pre > 0]`` (same as ``mlp_post > 0`` for GELU), bool,
    same shape as ``mlp_pre`` ``[..., n_steps, d_mlp]``."""
    return np.asarray(mlp_pre) > 0


def spline_hamming(mlp_pre) -> np.ndarray:
    """Neurons whose sign flips between consecutive steps: ``Hamming(c_k, c_{k+1})``,
    ``[..., n_steps, d_mlp] -> [..., n_steps - 1]`` (a count)."""
    c = spline_codes(_as_curve(mlp_pre, "mlp_pre"))
    return np.sum(c[..., 1:, :] != c[..., :-1, :], axis=-1).astype(np.float64)


def spline_density(mlp_pre, resid_mid) -> np.ndarray:
    """Spline boundary crossings per unit of MLP-input path length, ``-> [..., n_steps - 1]``.

    ``h_k = Hamming(c_k, c_{k+1}) / |resid_mid_{k+1} - resid_mid_k|`` with ``c = [mlp_pre > 0]``
    of the same layer; ``mlp_pre`` ``[..., n_steps, d_mlp]``, ``resid_mid`` ``[..., n_steps, d]``.
    Units: neurons per unit of resid_mid norm. NaN for a zero step with no flip.
    """
    return _ratio(spline_hamming(mlp_pre), step_sizes(_as_curve(resid_mid, "resid_mid")))


def log_softmax(logits) -> np.ndarray:
    """Numerically stable ``log softmax`` over the last axis, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_divergence(logits_p, logits_q) -> np.ndarray:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` of the softmaxes over the last axis (nats);
    ``[..., V], [..., V] -> [...]`` (broadcasting)."""
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def kl_to_endpoints(logits) -> np.ndarray:
    """KL divergence of each endpoint's next-token distribution to each step's, in nats.

    ``logits`` ``[..., n_steps, V] -> [..., 2, n_steps]``: index 0 is ``KL(p_A || p_k)``,
    index 1 is ``KL(p_B || p_k)`` (the endpoint is the reference distribution, as in the
    "sensitive directions" work). ``[..., 0, 0] == 0`` and ``[..., 1, -1] == 0``.
    """
    z = _as_curve(logits, "logits")
    return np.stack([kl_divergence(z[..., :1, :], z), kl_divergence(z[..., -1:, :], z)], axis=-2)


def _check_alpha(alpha, n_steps: int) -> np.ndarray:
    alpha = np.asarray(alpha, np.float64)
    if alpha.shape != (n_steps,):
        raise ValueError(f"alpha must have shape [{n_steps}] to match the curve; got {alpha.shape}.")
    if np.any(np.diff(alpha) <= 0):
        raise ValueError("alpha must be strictly increasing.")
    return alpha


def slopes(r, alpha) -> np.ndarray:
    """``(r_{k+1} - r_k) / (alpha_{k+1} - alpha_k)``, ``[..., n_steps] -> [..., n_steps - 1]``."""
    r = np.asarray(r, np.float64)
    alpha = _check_alpha(alpha, r.shape[-1])
    return np.diff(r, axis=-1) / np.diff(alpha)


def sharpness(r, alpha) -> np.ndarray:
    """Sharpness ``S = max_k (r_{k+1} - r_k) / (alpha_{k+1} - alpha_k)``, ``[..., n_steps] -> [...]``.

    A straight line ``r = alpha`` gives S = 1; a jump of height h within one step of width w
    gives ``S = h / w``. NaN if any slope of the curve is NaN.
    """
    return np.max(slopes(r, alpha), axis=-1)


def boundary(r, alpha) -> np.ndarray:
    """Boundary location ``alpha* = (alpha_{k*} + alpha_{k*+1}) / 2`` with ``k*`` the steepest
    step (the argmax in :func:`sharpness`; the first one on ties), ``[..., n_steps] -> [...]``.

    Its resolution is the grid spacing. NaN where the sharpness is NaN.
    """
    s = slopes(r, alpha)
    alpha = np.asarray(alpha, np.float64)
    mid = 0.5 * (alpha[1:] + alpha[:-1])
    k = np.argmax(np.where(np.isnan(s), -np.inf, s), axis=-1)
    return np.where(np.isnan(s.max(axis=-1)), np.nan, mid[k])
