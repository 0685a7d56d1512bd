"""Norms of Jacobians: reductions of dense matrices and matrix-free estimates.

Conventions: a Jacobian ``J`` is ``[d_out, d_in]`` with ``J[i, j] = d out_i / d in_j`` (what
``jax.jacfwd`` and ``torch.func.jacrev`` return). Every function here is pure and composes with
``jit``/``vmap``/``lax.map``.

* :func:`reduce_dense` -- Frobenius norm, spectral norm and top-k singular values of dense
  matrices (exact; the singular values come from ``jnp.linalg.svd``).
* :func:`power_spectral_norm` -- matrix-free spectral norm by power iteration on ``J^T J`` using
  one ``jvp`` and one ``vjp`` per iteration (``J`` is never formed).
* :func:`hutchinson_frobenius` -- matrix-free estimate of ``||J||_F^2`` from ``k`` Rademacher
  probes (``E |J v|^2 = ||J||_F^2``) with its standard error.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

DENSE_STATS = ("fro", "spec", "topk")


def reduce_dense(J: Array, stats: Sequence[str], top_k: int = 0) -> Dict[str, Array]:
    """Reductions of ``J`` ``[..., d_out, d_in]``.

    Returns ``{"fro": [...], "spec": [...], "topk": [..., top_k]}`` for the requested stats.
    ``spec`` and ``topk`` share one singular-value decomposition (values only).
    """
    out = {}
    Jf = J.astype(jnp.float32) if J.dtype in (jnp.bfloat16, jnp.float16) else J
    if "fro" in stats:
        out["fro"] = jnp.sqrt(jnp.sum(jnp.square(Jf), axis=(-2, -1)))
    if "spec" in stats or ("topk" in stats and top_k > 0):
        s = jnp.linalg.svd(Jf, compute_uv=False)  # descending
        if "spec" in stats:
            out["spec"] = s[..., 0]
        if "topk" in stats and top_k > 0:
            k = min(top_k, s.shape[-1])
            out["topk"] = s[..., :k]
    return out


def power_spectral_norm(f: Callable[[Array], Array], x: Array, key: Array, iters: int = 30) -> Array:
    """Largest singular value of ``J = df/dx`` at ``x`` (``f: [d_in] -> [d_out]``), matrix-free.

    Power iteration on ``J^T J``: each iteration is one Jacobian-vector product (``jvp`` through
    the linearisation) and one vector-Jacobian product (its transpose). Converges from below;
    ``iters`` iterations give relative error about ``(s2/s1)^(2 iters)``.
    """
    _, jvp_fn = jax.linearize(f, x)
    vjp_fn = jax.linear_transpose(jvp_fn, x)
    v = jax.random.normal(key, x.shape, x.dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        w = vjp_fn(jvp_fn(v))[0]
        return w / (jnp.linalg.norm(w) + jnp.finfo(w.dtype).tiny)

    v = jax.lax.fori_loop(0, iters, body, v)
    return jnp.linalg.norm(jvp_fn(v))


def hutchinson_frobenius(f: Callable[[Array], Array], x: Array, key: Array, probes: int = 16):
    """Estimate of ``||df/dx||_F`` from ``probes`` Rademacher vectors, matrix-free.

    Returns ``(estimate, stderr)``: ``estimate = sqrt(mean_j |J v_j|^2)`` and the standard error
    of that square root by the delta method, ``se(mean) / (2 estimate)``.
    """
    v = jax.random.rademacher(key, (probes,) + x.shape, x.dtype)
    _, jvp_fn = jax.linearize(f, x)
    sq = jnp.sum(jnp.square(jax.vmap(jvp_fn)(v)), axis=-1)  # [probes]
    mean = jnp.mean(sq)
    se_sq = jnp.std(sq, ddof=1) / jnp.sqrt(probes) if probes > 1 else jnp.zeros_like(mean)
    est = jnp.sqrt(mean)
    return est, se_sq / (2.0 * est + jnp.finfo(est.dtype).tiny)
