"""Per-pair statistics: small curves reduced on device, scalar statistics on the host.

Device side (JAX, inside the sharded call of :mod:`.engine`, computed with the same functions of
:mod:`plateau_jax.plateaus.metrics` as the host analysis; never returns raw activations): for
every recording target (each downstream layer's component, then the logits) the relative-distance
curve ``r``,
the distance curve ``d`` and step sizes; for every downstream MLP the exact Jacobian Frobenius
norm at each step and the spline Hamming counts and the step lengths of the MLP's input
(``resid_mid``; ``resid_pre`` with a parallel residual); KL of the next-token distributions; the
endpoints' angle.

Host side (numpy, float64, :func:`pair_stats`): sharpness and boundary from
:mod:`plateau_jax.plateaus.metrics`, plateau widths, KL at the boundary, Jacobian-norm and
spline-density peaks, and the refined values from the device bracket and window.

Two curves, two sharpnesses (different numbers; never compare one with the other):

* ``r_k = |y_k - y_0| / (|y_k - y_0| + |y_k - y_{n-1}|)``, the study's relative distance;
* ``d_k = |y_k - y_0| / |y_{n-1} - y_0|``, the "stable regions" work's distance curve.

Definitions (``n`` steps at ``alpha_k``; ``k*`` the steepest step of ``r``; ``w`` =
``sharpness_width``):

* ``S_r_grid = max_k (r_{k+1}-r_k)/(alpha_{k+1}-alpha_k)``, ``S_d_grid`` the same on ``d``;
  ``alpha_grid = (alpha_k* + alpha_k*+1)/2`` (located on r).
* ``alpha_ref``: the midpoint of the steepest step of r after bisecting it to ``tol``
  (:mod:`.refine`); ``ref_width`` the final bracket's width.
* ``S_r_ref = (r(hi_w) - r(lo_w)) / w`` over the window ``[lo_w, hi_w]`` of width ``w`` centred on
  ``alpha_ref`` (shifted inside [0, 1] near an end), both ends evaluated exactly;
  ``S_d_ref`` the same on ``d`` over the same window (so at the boundary located on r).
  Independent of ``n_steps``; for a jump of height h, ``h / w`` plus the smooth part.
* plateau widths: ``width_a = max{alpha_k : r_j <= tol_p for all j <= k}``,
  ``width_b = 1 - min{alpha_k : r_j >= 1 - tol_p for all j >= k}`` (tol_p = 0.05 by default),
  ``width = width_a + width_b`` (a straight line ``r = alpha`` gives about 2 tol_p), and a pair
  counts as a plateau at a target when ``width >= plateau_width`` (default 0.5).
* ``kl_boundary_grid = KL(p(alpha_k*) || p(alpha_k*+1))`` (nats): how much the next-token
  distribution changes across the boundary step; ``kl_boundary_ref`` the same across the refined
  bracket.
* ``jac_peak_alpha``/``jac_peak``: argmax over steps (first on ties) and max of
  ``||d mlp_out_l / d resid_mid_l||_F`` (``resid_pre_l`` with a parallel residual) for the MLP of
  the recording layer l (its MLP runs before its resid_post); NaN for the logits target.
* ``spline_peak_alpha``/``spline_peak``: midpoint of the step with the largest spline density
  ``h_k = Hamming(c_k, c_k+1)/|resid_mid_k+1 - resid_mid_k|`` of layer l, and that density.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from plateau_jax.plateaus import metrics

STAT_NAMES = ("S_r_grid", "S_r_ref", "S_d_grid", "S_d_ref", "alpha_grid", "alpha_ref",
              "ref_width", "width_a", "width_b", "width", "plateau", "kl_boundary_grid",
              "kl_boundary_ref", "jac_peak_alpha", "jac_peak", "spline_peak_alpha", "spline_peak")


def plateau_widths(r, alpha, tol: float = 0.05):
    """``(width_a, width_b)`` of ``r`` ``[..., n]``: how far from each endpoint r stays within
    ``tol`` of that endpoint's value (0 and 1); NaN entries never count as within."""
    r = np.asarray(r, np.float64)
    alpha = np.asarray(alpha, np.float64)
    near_a = np.nan_to_num(r, nan=np.inf) <= tol
    near_b = np.nan_to_num(r, nan=-np.inf) >= 1.0 - tol
    run_a = np.cumprod(near_a, axis=-1).astype(bool)                 # True while all j <= k near A
    run_b = np.cumprod(near_b[..., ::-1], axis=-1)[..., ::-1].astype(bool)
    wa = np.max(np.where(run_a, alpha, 0.0), axis=-1)
    wb = 1.0 - np.min(np.where(run_b, alpha, 1.0), axis=-1)
    return wa, wb


def pair_stats(curves: Dict[str, np.ndarray], alpha, plateau_tol: float = 0.05,
               plateau_width: float = 0.5) -> Dict[str, np.ndarray]:
    """Scalar statistics per (pair, target) from the device curves.

    ``curves`` (``P`` pairs, ``T`` targets = ``nl`` layers then the logits)::

      r, dist [P, T, n], jac [P, nl, n], hamming [P, nl, n-1], mid_step [P, nl, n-1],
      kl_next [P, n-1], ref_lo, ref_hi, ref_kl, win_lo, win_hi, win_r_lo, win_r_hi,
      win_d_lo, win_d_hi [P, T]

    Returns ``{name: [P, T]}`` for every name in :data:`STAT_NAMES` (``plateau`` as 0/1).
    """
    alpha = np.asarray(alpha, np.float64)
    f64 = lambda c: np.asarray(curves[c], np.float64)
    r = f64("r")
    P, T, n = r.shape
    nl = curves["jac"].shape[1]
    out = {"S_r_grid": metrics.sharpness(r, alpha), "S_d_grid": metrics.sharpness(f64("dist"), alpha),
           "alpha_grid": metrics.boundary(r, alpha)}
    k, _ = metrics.steepest_step(r, alpha)  # the same k* as boundary()
    kl_next = f64("kl_next")
    out["kl_boundary_grid"] = np.where(np.isnan(out["S_r_grid"]), np.nan,
                                       np.take_along_axis(kl_next, k, axis=-1))
    lo, hi = f64("ref_lo"), f64("ref_hi")
    out["alpha_ref"] = 0.5 * (lo + hi)
    out["ref_width"] = hi - lo
    w = f64("win_hi") - f64("win_lo")
    out["S_r_ref"] = (f64("win_r_hi") - f64("win_r_lo")) / w
    out["S_d_ref"] = (f64("win_d_hi") - f64("win_d_lo")) / w
    out["kl_boundary_ref"] = f64("ref_kl")
    wa, wb = plateau_widths(r, alpha, plateau_tol)
    out["width_a"], out["width_b"], out["width"] = wa, wb, wa + wb
    out["plateau"] = (out["width"] >= plateau_width).astype(np.float64)
    nan_t = np.full((P, T - nl), np.nan)
    kj, hj = metrics.peak(curves["jac"])
    out["jac_peak_alpha"] = np.concatenate([np.where(np.isnan(hj), np.nan, alpha[kj]), nan_t], 1)
    out["jac_peak"] = np.concatenate([hj, nan_t], 1)
    dens = metrics.ratio(curves["hamming"], curves["mid_step"])  # spline density h_k
    ks, hs = metrics.peak(dens)
    mid = 0.5 * (alpha[1:] + alpha[:-1])
    out["spline_peak_alpha"] = np.concatenate([np.where(np.isnan(hs), np.nan, mid[ks]), nan_t], 1)
    out["spline_peak"] = np.concatenate([hs, nan_t], 1)
    return out
