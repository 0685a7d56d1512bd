r"""Closed-form MLP Jacobians and their exact Frobenius norms from per-layer Gram matrices, for
LayerNorm or RMSNorm and plain (GPT-2, GPT-NeoX) or gated (SwiGLU: Llama, Qwen2) MLPs.

The MLP of block ``l`` as a function of its input ``h`` (``hook_resid_mid``; ``hook_resid_pre``
with a parallel residual), one position, ln2 included::

    u = N(h) = w * y (+ b)
        LayerNorm:  y = (h - mean(h)) / s,   s = sqrt(var(h) + eps)
        RMSNorm:    y = h / s,               s = sqrt(mean(h^2) + eps)
    plain:  out = act(u @ W_in + b_in) @ W_out + b_out
    gated:  out = (act(gt) * lin) @ W_out + b_out,   gt = u @ W_gate + b_gate,  lin = u @ W_in + b_in

(``W_in``, ``W_gate`` [d, m], ``W_out`` [m, d]; ``J[i, j] = d out_i / d h_j``, shape [d, d].)

**Norm Jacobian.** ``dN/dh = diag(w) P / s`` with

    LayerNorm:  P = I - 1 1^T / d - y y^T / d      (y has zero mean)
    RMSNorm:    P = I - y y^T / d                  (no mean removal)
    identity (ln_mode="identity"):  P = I, s = 1

(RMSNorm: ``ds/dh_j = h_j / (d s)``, so ``dy_i/dh_j = delta_ij / s - h_i h_j / (d s^3)
= (delta_ij - y_i y_j / d) / s``.)

**One stacked form for both MLPs.** ``d out / d u`` is ``W_out^T diag(act'(pre)) W_in^T``
(plain) or ``W_out^T [diag(act'(gt) * lin) W_gate^T + diag(act(gt)) W_in^T]`` (gated): a sum
over *branches* ``j`` of ``W_out^T diag(gamma_j) W_j^T`` with

    plain:  one branch   W_1 = W_in,                    gamma_1 = act'(pre)
    gated:  two branches W_1 = W_gate, W_2 = W_in,      gamma_1 = act'(gt) * lin,  gamma_2 = act(gt)

Write ``Wt_j = diag(w) W_j`` and ``Wc_j`` for ``Wt_j`` with its mean over the d rows removed
(LayerNorm; ``Wc_j = Wt_j`` for RMSNorm). Since ``Wt_j^T (I - 1 1^T/d) = Wc_j^T`` and
``Wt_j^T y = Wc_j^T y =: q_j`` (for LayerNorm because y has zero mean)::

    B_j := W_j^T dN/dh = (Wc_j^T - q_j y^T / d) / s                    [m, d]
    J   = W_out^T  sum_j diag(gamma_j) B_j
        = W_out^T [ sum_j gamma_j o Wc_j^T  -  (sum_j gamma_j o q_j) y^T / d ] / s

(``o`` elementwise, broadcast over rows). Computed as

    J = [A diag(gamma_1 / s) | A diag(gamma_2 / s)] [Wc_1^T ; Wc_2^T]  -  (A sum_j gamma_j o q_j) y^T / (d s)

so a batch of N steps is *one* ``[N d, b m] x [b m, d]`` matrix product against the shared,
input-independent ``[Wc_j^T]`` (b = number of branches; :func:`jacobian_operands` lays it out
once per layer) plus a rank-1 update: ``2 b m d^2`` flops per step. That is the minimum for
plain MLPs (torch's jacrev does twice as much, docs/benchmarks.md); for gated ones summing the
branches first would halve it but needs a transpose of every ``[d, d]`` result.

**Exact Frobenius norm without forming J.** With ``A = W_out^T`` and
``B_j B_k^T = (Wc_j^T Wc_k - beta q_j q_k^T) / s^2``, ``beta = (2 - |y|^2/d) / d`` (expand
``(Wc_j^T - q_j y^T/d)(Wc_k - y q_k^T/d)`` using ``Wc_j^T y = q_j``)::

    ||J||_F^2 = sum_jk gamma_j^T ((A^T A) o (B_j B_k^T)) gamma_k
              = [ sum_jk gamma_j^T M_jk gamma_k  -  beta |W_out^T (sum_j gamma_j o q_j)|^2 ] / s^2
    M_jk = G o (Wc_j^T Wc_k),   G = W_out W_out^T                      [m, m]

``M`` depends only on the weights: computed once per layer, reused for every step and prompt
pair. Plain MLPs have one block ``M_11``; gated MLPs three (``M_11, M_12, M_22``; ``M_21 =
M_12^T``), stored as ``[3, m, m]``. Identity mode: ``s = 1``, ``beta = 0``.

**Costs** (flops, 2 per multiply-add; ``m`` = d_mlp, ``d`` = d_model). Per step: dense closed
form ``2 m d^2`` (plain) or ``4 m d^2`` (gated) + O(m d); Gram form ``2 m^2`` (plain) or ``6 m^2`` (gated:
three quadratic forms) + O(m d). The Gram form is cheaper when ``m < d^2`` (plain) or
``3 m < d^2`` (gated), which holds for every real model (Pythia-160m: d=768, m=3072;
SmolLM-135M: d=576, m=1536; Llama-2-7B: d=4096, m=11008). Precomputation per layer: ``4 m^2 d``
(plain) or ``8 m^2 d`` (gated: G and three Wc products), repaid after about ``2 m / d`` (plain)
or ``4 m / d`` (gated) steps: 8 steps for Pythia-160m, 11 for SmolLM-135M, summed over every
step of every prompt pair that shares them. Memory: ``m^2`` (plain) or ``3 m^2`` (gated) floats
per layer: SmolLM-135M 28 MB, Llama-2-7B 1.45 GB per layer (pass ``grams=None`` to compute each
layer's inside the sweep instead of holding every layer's).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp

from plateau_jax.model.config import ModelConfig
from plateau_jax.model.layers import ACTIVATIONS

Array = jax.Array


def _check(config: ModelConfig):
    if config.norm not in ("layernorm", "rmsnorm"):
        raise NotImplementedError(f"closed-form MLP Jacobians: unknown norm {config.norm!r}; use "
                                  "mlp_method='autodiff'.")


def _branches(config: ModelConfig) -> Tuple[str, ...]:
    """The weights each branch multiplies the normalised input by (see the module docstring)."""
    return ("W_gate", "W_in") if config.gated_mlp else ("W_in",)


def _norm_parts(block_params, config: ModelConfig, h: Array):
    """(u = N(h), y, s) for h [..., d]; identity mode gives (h, None, 1)."""
    _check(config)
    if config.ln_mode == "identity":
        return h, None, jnp.ones(h.shape[:-1] + (1,), h.dtype)
    p = block_params["ln2"]
    if config.norm == "layernorm":
        c = h - jnp.mean(h, axis=-1, keepdims=True)
    else:
        c = h
    s = jnp.sqrt(jnp.mean(jnp.square(c), axis=-1, keepdims=True) + config.norm_eps)
    y = c / s
    u = y * p["w"].astype(h.dtype)
    return (u + p["b"].astype(h.dtype) if "b" in p else u), y, s


def _coefficients(block_params, config: ModelConfig, h: Array):
    """([gamma_j [..., m] per branch], y, s)."""
    u, y, s = _norm_parts(block_params, config, h)
    mlp = block_params["mlp"]

    def dense(w, b):
        out = u @ mlp[w].astype(h.dtype)
        return out + mlp[b].astype(h.dtype) if b in mlp else out

    act = ACTIVATIONS[config.act]
    slope = lambda x: jax.jvp(act, (x,), (jnp.ones_like(x),))[1]
    if config.gated_mlp:
        gt, lin = dense("W_gate", "b_gate"), dense("W_in", "b_in")
        return [slope(gt) * lin, act(gt)], y, s
    return [slope(dense("W_in", "b_in"))], y, s


def _wc(block_params, config: ModelConfig, dtype, name: str) -> Array:
    """``Wc`` [d, m] of branch weight ``name``: norm-weight-scaled, centred over d for
    LayerNorm (just the weight in identity mode)."""
    _check(config)
    w = block_params["mlp"][name].astype(dtype)
    if config.ln_mode == "identity":
        return w
    wt = block_params["ln2"]["w"].astype(dtype)[:, None] * w
    return wt - jnp.mean(wt, axis=0, keepdims=True) if config.norm == "layernorm" else wt


def _wcs(block_params, config, dtype) -> List[Array]:
    return [_wc(block_params, config, dtype, n) for n in _branches(config)]


def jacobian_operands(block_params, config: ModelConfig, dtype=None) -> Dict[str, Array]:
    """The input-independent operands of :func:`mlp_jacobian`, laid out for one big product.

    ``w_out`` [m, d], ``w_out_t`` = ``W_out^T`` [d, m] and ``wc_t`` = the branches' ``Wc_j^T``
    stacked [b m, d] (contiguous). Compute once per layer, outside any loop over steps, and pass
    as ``operands=``: inside a loop XLA would otherwise redo the transposes in every step
    (strided reads, measured 3x slower than the scaling itself).
    """
    dtype = dtype or block_params["mlp"]["W_in"].dtype
    w_out = block_params["mlp"]["W_out"].astype(dtype)
    return {"w_out": w_out, "w_out_t": w_out.T,
            "wc_t": jnp.concatenate([wc.T for wc in _wcs(block_params, config, dtype)])}


def mlp_jacobian(block_params, config: ModelConfig, h: Array, operands=None) -> Array:
    """Closed-form ``d hook_mlp_out / d (MLP input)`` at ``h`` [..., d] -> [..., d, d].

    ``block_params`` is ``model.block(layer)``; ``operands`` from :func:`jacobian_operands`
    (computed here if None). All steps in ``h`` are one matrix product (module docstring).
    """
    ops = operands if operands is not None else jacobian_operands(block_params, config, h.dtype)
    gammas, y, s = _coefficients(block_params, config, h)
    d, m = ops["w_out_t"].shape
    lead = h.shape[:-1]
    coef = jnp.concatenate(gammas, axis=-1) / s  # [..., b m]
    scaled = jnp.tile(ops["w_out_t"], (1, len(gammas))) * coef[..., None, :]  # [..., d, b m]
    J = (scaled.reshape(-1, coef.shape[-1]) @ ops["wc_t"]).reshape(lead + (d, d))
    if config.ln_mode == "identity":
        return J
    wcs = ops["wc_t"].reshape(len(gammas), m, d)
    gq = sum(g * jnp.einsum("...d,md->...m", y, wc) for g, wc in zip(gammas, wcs))
    u = (gq @ ops["w_out"]) / s  # W_out^T (sum_j gamma_j o q_j) / s   [..., d]
    return J - u[..., :, None] * y[..., None, :] / d


def mlp_grams(block_params, config: ModelConfig, dtype=None) -> Dict[str, Array]:
    """Per-layer Gram matrices ``{"M": ...}``: ``(W_out W_out^T) o (Wc^T Wc)`` [m, m] for plain
    MLPs, the three blocks ``[M_11, M_12, M_22]`` [3, m, m] for gated ones.

    They depend only on the weights: compute once per layer, reuse for every step and every
    prompt pair. Memory: m^2 (plain) or 3 m^2 (gated) floats per layer (GPT-2 small 38 MB,
    Large 105 MB; SmolLM-135M 28 MB).
    """
    dtype = dtype or block_params["mlp"]["W_in"].dtype
    w_out = block_params["mlp"]["W_out"].astype(dtype)
    G = w_out @ w_out.T
    wcs = _wcs(block_params, config, dtype)
    if len(wcs) == 1:
        return {"M": G * (wcs[0].T @ wcs[0])}
    g, i = wcs
    return {"M": jnp.stack([G * (g.T @ g), G * (g.T @ i), G * (i.T @ i)])}


def mlp_frobenius_gram(block_params, config: ModelConfig, h: Array, grams=None) -> Array:
    """Exact ``||d mlp_out / d (MLP input)||_F`` at ``h`` [N, d] -> [N], without forming J.

    ``grams`` from :func:`mlp_grams` (computed here if None). Cost per step O(m d + m^2).
    """
    grams = grams if grams is not None else mlp_grams(block_params, config, h.dtype)
    M = grams["M"].astype(h.dtype)
    gammas, y, s = _coefficients(block_params, config, h)
    # a^T M b summed by a product with ones, not jnp.sum: XLA:CPU (jax 0.10) fuses a reduction
    # together with the Gram products that feed it into one fusion that runs ~25x slower.
    ones = jnp.ones((M.shape[-1],), h.dtype)
    quad = lambda a, Mab, b: ((a @ Mab) * b) @ ones
    if config.gated_mlp:
        a, c = gammas
        sq = quad(a, M[0], a) + 2.0 * quad(a, M[1], c) + quad(c, M[2], c)
    else:
        sq = quad(gammas[0], M, gammas[0])
    if config.ln_mode != "identity":
        d = h.shape[-1]
        gq = sum(g * (y @ wc) for g, wc in zip(gammas, _wcs(block_params, config, h.dtype)))
        beta = (2.0 - jnp.sum(y * y, axis=-1) / d) / d
        w_out = block_params["mlp"]["W_out"].astype(h.dtype)  # [m, d]
        rank1 = jnp.sum(jnp.square(gq @ w_out), axis=-1)  # |W_out^T (sum_j gamma_j o q_j)|^2
        sq = (sq - beta * rank1) / jnp.square(s[..., 0])
    return jnp.sqrt(jnp.maximum(sq, 0.0))
