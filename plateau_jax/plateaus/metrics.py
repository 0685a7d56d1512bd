"""Plateau metrics on interpolation curves, vectorised over leading axes: one implementation for
numpy and JAX inputs.

Conventions: ``y`` is any recorded vector as a function of the interpolation parameter,
shaped ``[..., n_steps, d]`` (leading axes are pairs, layers, ... in any number); step ``k``
sits at ``alpha[k]``, step 0 is endpoint A (alpha = 0) and step ``n_steps - 1`` endpoint B
(alpha = 1). Norms are Euclidean over the last axis, in the units of ``y``.

Array module (:func:`array_module`): numpy inputs are computed in float64 and give numpy arrays
(the host analysis); JAX inputs, tracers included, are computed with ``jax.numpy`` in their own
dtype and give JAX arrays, so every function here also runs inside ``jit``/``vmap``/``shard_map``
(the sweep engine reduces its curves on the device with them). Mixed inputs count as JAX.
Shape checks use static shapes; checks of values (the alpha grid) run when the values are
concrete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def array_module(*arrays):
    """``jax.numpy`` if any argument is a JAX array (tracers included), else ``numpy``."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _float(xp, x):
    """``x`` as a float array: float64 with numpy; with JAX its own float dtype (integers and
    booleans become JAX's default float)."""
    if xp is np:
        return np.asarray(x, np.float64)
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _as_curve(y, name: str = "y"):
    xp = array_module(y)
    y = _float(xp, y)
    if y.ndim < 2 or y.shape[-2] < 2:
        raise ValueError(f"{name} must have shape [..., n_steps, d] with n_steps >= 2; "
                         f"got {y.shape}.")
    return y


def _norm(v):
    return array_module(v).linalg.norm(v, axis=-1)


def ratio(num, den):
    """``num / den`` elementwise (broadcasting), without warnings: NaN where both are 0, inf
    where only ``den`` is 0."""
    xp = array_module(num, den)
    if xp is jnp:
        return num / den
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


# ----------------------------------------------------------------------------- distances

def endpoint_distances(y):
    """``(|y_k - y_0|, |y_k - y_{n-1}|)``, each ``[..., n_steps, d] -> [..., n_steps]``."""
    y = _as_curve(y)
    return _norm(y - y[..., :1, :]), _norm(y - y[..., -1:, :])


def relative_from_distances(da, db):
    """``da / (da + db)``: the relative distance from the distances to endpoints A and B (NaN
    where both are 0)."""
    return ratio(da, da + db)


def relative_distance(y):
    """Relative distance of each step to the two endpoints, ``[..., n_steps, d] -> [..., n_steps]``.

    ``r_k = |y_k - y_0| / (|y_k - y_0| + |y_k - y_{n-1}|)``: exactly 0 at A and 1 at B (when
    ``y_0 != y_{n-1}``); a plateau is a flat stretch, a boundary a jump. NaN where ``y_k``
    equals both endpoints (e.g. a frozen component).
    """
    return relative_from_distances(*endpoint_distances(y))


def relative_distance_to(y, y0, y1):
    """:func:`relative_distance` of points ``y`` ``[..., d] -> [...]`` between given endpoints
    ``y0``, ``y1`` (broadcast against ``y``), e.g. points off the alpha grid."""
    return relative_from_distances(_norm(y - y0), _norm(y - y1))


def distance_curve(y):
    """``d_k / d_{n-1}`` with ``d_k = |y_k - y_0|`` (the "stable regions" curve), ``-> [..., n_steps]``.

    0 at A and 1 at B; unlike :func:`relative_distance` it can exceed 1 (overshoot).
    """
    d, _ = endpoint_distances(y)
    return ratio(d, d[..., -1:])


def distance_to(y, y0, y1):
    """:func:`distance_curve` of points ``y`` ``[..., d] -> [...]``: ``|y - y0| / |y1 - y0|``."""
    return ratio(_norm(y - y0), _norm(y1 - y0))


def step_sizes(y):
    """``s_k = |y_{k+1} - y_k|``, ``[..., n_steps, d] -> [..., n_steps - 1]`` (units of y)."""
    y = _as_curve(y)
    return _norm(array_module(y).diff(y, axis=-2))


# ----------------------------------------------------------------------------- splines

def spline_codes(mlp_pre):
    """Spline code of an MLP: ``c = [mlp_pre > 0]`` (same as ``mlp_post > 0`` for GELU), bool,
    same shape as ``mlp_pre`` ``[..., n_steps, d_mlp]``."""
    return array_module(mlp_pre).asarray(mlp_pre) > 0


def spline_hamming(mlp_pre):
    """Neurons whose sign flips between consecutive steps: ``Hamming(c_k, c_{k+1})``,
    ``[..., n_steps, d_mlp] -> [..., n_steps - 1]`` (a count, as a float)."""
    pre = _as_curve(mlp_pre, "mlp_pre")
    xp = array_module(pre)
    c = spline_codes(pre)
    count = xp.sum(c[..., 1:, :] != c[..., :-1, :], axis=-1)
    return count.astype(np.float64 if xp is np else jnp.result_type(float))


def spline_density(mlp_pre, resid_mid):
    """Spline boundary crossings per unit of MLP-input path length, ``-> [..., n_steps - 1]``.

    ``h_k = Hamming(c_k, c_{k+1}) / |resid_mid_{k+1} - resid_mid_k|`` with ``c = [mlp_pre > 0]``
    of the same layer; ``mlp_pre`` ``[..., n_steps, d_mlp]``, ``resid_mid`` ``[..., n_steps, d]``.
    Units: neurons per unit of resid_mid norm. NaN for a zero step with no flip.
    """
    return ratio(spline_hamming(mlp_pre), step_sizes(_as_curve(resid_mid, "resid_mid")))


# ----------------------------------------------------------------------------- distributions

def log_softmax(logits):
    """Numerically stable ``log softmax`` over the last axis (float64 with numpy;
    ``jax.nn.log_softmax`` with JAX)."""
    xp = array_module(logits)
    if xp is jnp:
        return jax.nn.log_softmax(_float(xp, logits), axis=-1)
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_from_log_probs(lp, lq):
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last axis (nats) from
    log-probabilities; ``[..., V], [..., V] -> [...]`` (broadcasting)."""
    xp = array_module(lp, lq)
    return xp.sum(xp.exp(lp) * (lp - lq), axis=-1)


def kl_divergence(logits_p, logits_q):
    """``KL(p || q)`` of the softmaxes of two logit arrays over the last axis (nats);
    ``[..., V], [..., V] -> [...]`` (broadcasting)."""
    return kl_from_log_probs(log_softmax(logits_p), log_softmax(logits_q))


def kl_to_endpoints(logits):
    """KL divergence of each endpoint's next-token distribution to each step's, in nats.

    ``logits`` ``[..., n_steps, V] -> [..., 2, n_steps]``: index 0 is ``KL(p_A || p_k)``,
    index 1 is ``KL(p_B || p_k)`` (the endpoint is the reference distribution, as in the
    "sensitive directions" work). ``[..., 0, 0] == 0`` and ``[..., 1, -1] == 0``.
    """
    z = _as_curve(logits, "logits")
    xp = array_module(z)
    return xp.stack([kl_divergence(z[..., :1, :], z), kl_divergence(z[..., -1:, :], z)], axis=-2)


# ----------------------------------------------------------------------------- steepest step

def argmax_ignoring_nan(v):
    """Index of the largest entry over the last axis, NaN never winning (the first one on ties;
    0 where every entry is NaN)."""
    xp = array_module(v)
    return xp.argmax(xp.where(xp.isnan(v), -xp.inf, v), axis=-1)


def take_last(v, k):
    """``v[..., k]`` with one index per leading position: ``[..., n], [...] -> [...]``."""
    return array_module(v, k).take_along_axis(v, k[..., None], axis=-1)[..., 0]


def peak(v):
    """``(index, value)`` of the largest entry over the last axis (:func:`argmax_ignoring_nan`);
    the value is NaN where every entry is NaN."""
    xp = array_module(v)
    v = _float(xp, v)
    k = argmax_ignoring_nan(v)
    return k, xp.where(xp.all(xp.isnan(v), axis=-1), xp.nan, take_last(v, k))


def _check_alpha(alpha, n_steps: int) -> np.ndarray:
    alpha = np.asarray(alpha, np.float64)
    if alpha.shape != (n_steps,):
        raise ValueError(f"alpha must have shape [{n_steps}] to match the curve; got {alpha.shape}.")
    if np.any(np.diff(alpha) <= 0):
        raise ValueError("alpha must be strictly increasing.")
    return alpha


def _curve_and_alpha(r, alpha):
    """``r`` as floats and ``alpha`` checked (when concrete) and in ``r``'s dtype."""
    xp = array_module(r, alpha)
    r = _float(xp, r)
    if not isinstance(alpha, jax.core.Tracer):
        alpha = _check_alpha(alpha, r.shape[-1])
    elif alpha.shape != (r.shape[-1],):
        raise ValueError(f"alpha must have shape [{r.shape[-1]}] to match the curve; got "
                         f"{alpha.shape}.")
    return r, xp.asarray(alpha, r.dtype)


def slopes(r, alpha):
    """``(r_{k+1} - r_k) / (alpha_{k+1} - alpha_k)``, ``[..., n_steps] -> [..., n_steps - 1]``."""
    r, alpha = _curve_and_alpha(r, alpha)
    xp = array_module(r)
    return xp.diff(r, axis=-1) / xp.diff(alpha)


def steepest_step(r, alpha):
    """``(k*, slopes)``: index of the steepest step of ``r`` ``[..., n_steps] -> [...]`` (NaN
    slopes never win, the first one on ties) and every step's slope (:func:`slopes`)."""
    s = slopes(r, alpha)
    return argmax_ignoring_nan(s), s


def sharpness(r, alpha):
    """Sharpness ``S = max_k (r_{k+1} - r_k) / (alpha_{k+1} - alpha_k)``, ``[..., n_steps] -> [...]``.

    A straight line ``r = alpha`` gives S = 1; a jump of height h within one step of width w
    gives ``S = h / w``. NaN if any slope of the curve is NaN.
    """
    s = slopes(r, alpha)
    return array_module(s).max(s, axis=-1)


def boundary(r, alpha):
    """Boundary location ``alpha* = (alpha_{k*} + alpha_{k*+1}) / 2`` with ``k*`` the steepest
    step (:func:`steepest_step`), ``[..., n_steps] -> [...]``.

    Its resolution is the grid spacing. NaN where the sharpness is NaN.
    """
    k, s = steepest_step(r, alpha)
    xp = array_module(s)
    alpha = _curve_and_alpha(r, alpha)[1]
    mid = 0.5 * (alpha[1:] + alpha[:-1])
    return xp.where(xp.isnan(s.max(axis=-1)), xp.nan, mid[k])
