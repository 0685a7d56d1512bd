"""Adaptive boundary refinement: bisect alpha inside the steepest grid step, then measure the
sharpness over a fixed width around the refined boundary.

The grid boundary ``alpha*`` is the midpoint of the steepest step, so it (and the sharpness S)
depends on the grid. Refinement halves that step repeatedly, each time keeping the half in which
``r`` rises more (the left half on ties, matching ``argmax``'s first-maximum rule), until the
bracket is no wider than ``tol``. For a jump the bracket closes on the jump; for a smooth
transition it closes on a point of steep rise. Refined values::

    alpha*_ref = (lo + hi) / 2
    S_ref      = (r(c + w/2) - r(c - w/2)) / w,   c = alpha*_ref  (window kept inside [0, 1])

with both window ends evaluated exactly (:func:`window`). The bracket itself is not used for S:
its final width lies anywhere between tol/2 and tol depending on the grid, so ``h / width``
(the previous definition) changed with ``n_steps``. ``S_ref`` at a fixed width ``w`` does not:
for a jump of height h it is ``h / w`` plus the smooth part, for a smooth curve the mean slope
over the width-w window at the boundary (``-> max dr/dalpha`` as w -> 0), and it converges as
``tol -> 0`` whatever the grid.

Everything here is traceable (``jit``/``vmap``/``shard_map``): the number of rounds is static.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.plateaus import metrics


def n_rounds(alpha, tol: float) -> int:
    """Bisection rounds so that the widest grid step shrinks to <= ``tol`` (0 disables)."""
    if tol is None or tol <= 0:
        return 0
    width = float(np.max(np.diff(np.asarray(alpha, np.float64))))
    return max(0, int(math.ceil(math.log2(width / tol) - 1e-12)))


class Bracket(NamedTuple):
    """A bracket ``[lo, hi]`` around a boundary with ``r`` and auxiliary values at both ends.

    ``lo``, ``hi``, ``r_lo``, ``r_hi`` share one shape (e.g. ``[targets]``); ``aux_lo``/``aux_hi``
    are arrays whose leading shape is that shape (e.g. log-probabilities ``[targets, V]``) or None.
    """

    lo: jax.Array
    hi: jax.Array
    r_lo: jax.Array
    r_hi: jax.Array
    aux_lo: object = None
    aux_hi: object = None


def steepest_step(r, alpha):
    """Index ``k*`` of the steepest step of ``r`` ``[..., n]`` and the bracket around it; ``k*``
    is :func:`plateau_jax.plateaus.metrics.steepest_step`'s (the rule of
    :func:`~plateau_jax.plateaus.metrics.boundary`: NaN slopes never win, first on ties)."""
    r = jnp.asarray(r)
    k, _ = metrics.steepest_step(r, alpha)
    alpha = jnp.asarray(alpha, r.dtype)
    take = metrics.take_last
    return k, Bracket(alpha[k], alpha[k + 1], take(r, k), take(r, k + 1))


def refine_boundary(eval_fn: Callable, bracket: Bracket, rounds: int) -> Bracket:
    """Bisects every bracket ``rounds`` times.

    Args:
      eval_fn: ``m -> (r(m), aux(m))`` evaluated at the midpoints ``m`` (shape of ``bracket.lo``);
        ``aux`` may be None.
      bracket: the starting brackets (e.g. from :func:`steepest_step`).
      rounds: static number of halvings (:func:`n_rounds`).
    """
    if rounds <= 0:
        return bracket

    def body(_, br: Bracket) -> Bracket:
        m = 0.5 * (br.lo + br.hi)
        r_m, aux_m = eval_fn(m)
        left = (r_m - br.r_lo) >= (br.r_hi - r_m)  # keep the half with the larger rise
        def pick(a, b):  # where(left, a, b) with left broadcast over aux's trailing axes
            if a is None:
                return None
            return jnp.where(jnp.reshape(left, left.shape + (1,) * (a.ndim - left.ndim)), a, b)

        return Bracket(jnp.where(left, br.lo, m), jnp.where(left, m, br.hi),
                       jnp.where(left, br.r_lo, r_m), jnp.where(left, r_m, br.r_hi),
                       pick(br.aux_lo, aux_m), pick(aux_m, br.aux_hi))

    return jax.lax.fori_loop(0, rounds, body, bracket)


def refined_values(bracket: Bracket):
    """``(alpha*_ref, bracket slope)`` from a refined bracket. The bracket slope
    ``(r(hi) - r(lo)) / (hi - lo)`` depends on the grid (see the module doc); the sharpness to
    report is the fixed-width slope over :func:`window`."""
    return 0.5 * (bracket.lo + bracket.hi), (bracket.r_hi - bracket.r_lo) / (bracket.hi - bracket.lo)


def window(bracket: Bracket, width: float):
    """``(lo, hi)``, ``hi - lo = width``: the window centred on the refined boundary, shifted to
    lie inside [0, 1] when the boundary is within ``width/2`` of an end."""
    c = 0.5 * (bracket.lo + bracket.hi)
    lo = jnp.clip(c - 0.5 * width, 0.0, 1.0 - width)
    return lo, lo + width
