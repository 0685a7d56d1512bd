"""Closed-form MLP Jacobians and their exact Frobenius norms from per-layer Gram matrices.

The MLP of block ``l`` as a function of ``h = hook_resid_mid`` (one position, ln2 included)::

    u   = LN(h) = w * y + b,   y = (h - mean(h)) / s,   s = sqrt(var(h) + eps)
    pre = u @ W_in + b_in       (W_in [d, m], W_out [m, d])
    out = gelu(pre) @ W_out + b_out                     (W_out [m, d])

With ``J[i, j] = d out_i / d h_j`` (shape [d_out, d_in]) and ``g = gelu'(pre)``::

    J = W_out^T diag(g) W_in^T L,   L = dLN/dh = diag(w) (I - 1 1^T/d - y y^T/d) / s

Write ``Wt = diag(w) W_in`` and ``Wc`` for ``Wt`` with its mean over the ``d`` rows removed
(``Wt^T (I - 1 1^T/d) = Wc^T``; ``y`` has zero mean, so ``Wt^T y = Wc^T y =: q``). Then::

    B := W_in^T L = (Wc^T - q y^T / d) / s                       [m, d]
    J = A diag(g) B,   A := W_out^T                             [d, m]

Exact Frobenius norm without forming J (``o`` = elementwise product)::

    ||J||_F^2 = g^T ((A^T A) o (B B^T)) g
    B B^T     = (Wc^T Wc - beta q q^T) / s^2,   beta = (2 - |y|^2/d) / d
    ||J||_F^2 = [ g^T M g - beta (g o q)^T G (g o q) ] / s^2
              = [ g^T M g - beta |W_out^T (g o q)|^2 ] / s^2

with ``G = W_out W_out^T`` and the per-layer Gram matrix ``M = G o (Wc^T Wc)`` ([m, m],
independent of the input, so computed once per layer and reusable across prompt pairs). Each
step then costs O(m d) for ``pre``, ``q`` and the rank-1 term and O(m^2) for one quadratic
form, instead of the O(m d^2) of a dense product. In identity-LayerNorm mode (``ln_mode="identity"``) L = I and
``||J||_F^2 = g^T (G o (W_in^T W_in)) g`` (``beta`` = 0, ``s`` = 1).
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from plateau_jax.model.config import ModelConfig
from plateau_jax.model.layers import ACTIVATIONS

Array = jax.Array


def _check(config: ModelConfig):
    if config.gated_mlp or config.norm != "layernorm":
        raise NotImplementedError(
            "the closed-form MLP Jacobian covers LayerNorm + ungated MLPs (GPT-2); use "
            "mlp_method='autodiff' for this model.")


def _ln_parts(block_params, config: ModelConfig, h: Array):
    """(u = LN(h), y, s) for h [..., d]; identity mode gives (h, None, 1)."""
    _check(config)
    if config.ln_mode == "identity":
        return h, None, jnp.ones(h.shape[:-1] + (1,), h.dtype)
    w = block_params["ln2"]["w"].astype(h.dtype)
    b = block_params["ln2"]["b"].astype(h.dtype)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    s = jnp.sqrt(var + config.norm_eps)
    y = (h - mean) / s
    return y * w + b, y, s


def _pre_and_slope(block_params, config, h):
    u, y, s = _ln_parts(block_params, config, h)
    mlp = block_params["mlp"]
    pre = u @ mlp["W_in"].astype(h.dtype)
    if "b_in" in mlp:
        pre = pre + mlp["b_in"].astype(h.dtype)
    g = jax.jvp(ACTIVATIONS[config.act], (pre,), (jnp.ones_like(pre),))[1]
    return pre, g, y, s


def _wc(block_params, config, dtype):
    """``Wc`` [d, m]: LN-weight-scaled W_in, centred over d (just W_in in identity mode)."""
    _check(config)
    w_in = block_params["mlp"]["W_in"].astype(dtype)
    if config.ln_mode == "identity":
        return w_in
    wt = block_params["ln2"]["w"].astype(dtype)[:, None] * w_in
    return wt - jnp.mean(wt, axis=0, keepdims=True)


def mlp_jacobian(block_params, config: ModelConfig, h: Array) -> Array:
    """Closed-form ``d hook_mlp_out / d hook_resid_mid`` at ``h`` [..., d] -> [..., d, d].

    ``block_params`` is ``model.block(layer)``. One [d, m] x [m, d] product per step.
    """
    _, g, y, s = _pre_and_slope(block_params, config, h)
    wc = _wc(block_params, config, h.dtype)
    w_out = block_params["mlp"]["W_out"].astype(h.dtype)  # [m, d]
    if config.ln_mode == "identity":
        B = jnp.broadcast_to(wc.T, h.shape[:-1] + wc.T.shape)
    else:
        d = h.shape[-1]
        q = y @ wc  # [..., m]
        B = (wc.T - q[..., :, None] * y[..., None, :] / d) / s[..., None]  # [..., m, d]
    A_g = w_out.T * g[..., None, :]  # [..., d, m]
    return A_g @ B


def mlp_grams(block_params, config: ModelConfig, dtype=None) -> Dict[str, Array]:
    """Per-layer Gram matrix ``{"M": (W_out W_out^T) o (Wc^T Wc)}`` [m, m].

    It depends only on the weights: compute once per layer (two m x d x m products), reuse for
    every step and every prompt pair. Memory: m^2 floats per layer (GPT-2 small 38 MB, Large
    105 MB, XL 164 MB).
    """
    dtype = dtype or block_params["mlp"]["W_in"].dtype
    w_out = block_params["mlp"]["W_out"].astype(dtype)
    wc = _wc(block_params, config, dtype)
    return {"M": (w_out @ w_out.T) * (wc.T @ wc)}


def mlp_frobenius_gram(block_params, config: ModelConfig, h: Array, grams=None) -> Array:
    """Exact ``||d mlp_out / d resid_mid||_F`` at ``h`` [N, d] -> [N], without forming J.

    ``grams`` from :func:`mlp_grams` (computed here if None). Cost per step O(m d + m^2).
    """
    grams = grams if grams is not None else mlp_grams(block_params, config, h.dtype)
    M = grams["M"].astype(h.dtype)
    _, g, y, s = _pre_and_slope(block_params, config, h)
    sq = jnp.sum((g @ M) * g, axis=-1)
    if config.ln_mode != "identity":
        d = h.shape[-1]
        wc = _wc(block_params, config, h.dtype)
        q = y @ wc
        beta = (2.0 - jnp.sum(y * y, axis=-1) / d) / d
        w_out = block_params["mlp"]["W_out"].astype(h.dtype)  # [m, d]
        rank1 = jnp.sum(jnp.square((g * q) @ w_out), axis=-1)  # (g o q)^T G (g o q)
        sq = (sq - beta * rank1) / jnp.square(s[..., 0])
    return jnp.sqrt(jnp.maximum(sq, 0.0))
