"""Temporary stand-ins for ``plateau_jax.metrics`` (issue 3) and ``plateau_jax.mlp_jacobian``
(issue 4), same signatures and conventions; used by :mod:`plateau_jax.sweep.backends` only while
those modules are absent. Delete once both are merged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.modules import gelu_new


def _ratio(num, den):
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def relative_distance(y):
    y = np.asarray(y, np.float64)
    da = np.linalg.norm(y - y[..., :1, :], axis=-1)
    db = np.linalg.norm(y - y[..., -1:, :], axis=-1)
    return _ratio(da, da + db)


def slopes(r, alpha):
    r = np.asarray(r, np.float64)
    return np.diff(r, axis=-1) / np.diff(np.asarray(alpha, np.float64))


def sharpness(r, alpha):
    return np.max(slopes(r, alpha), axis=-1)


def boundary(r, alpha):
    s = slopes(r, alpha)
    alpha = np.asarray(alpha, np.float64)
    mid = 0.5 * (alpha[1:] + alpha[:-1])
    k = np.argmax(np.where(np.isnan(s), -np.inf, s), axis=-1)
    return np.where(np.isnan(s.max(axis=-1)), np.nan, mid[k])


def kl_divergence(logits_p, logits_q):
    def lsm(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    lp, lq = lsm(logits_p), lsm(logits_q)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _wc(bp, config, dtype):
    w_in = bp["mlp"]["c_fc"]["weight"].astype(dtype)
    if config.ln_mode == "identity":
        return w_in
    wt = bp["ln_2"]["weight"].astype(dtype)[:, None] * w_in
    return wt - jnp.mean(wt, axis=0, keepdims=True)


def mlp_grams(bp, config, dtype=None):
    dtype = dtype or bp["mlp"]["c_fc"]["weight"].dtype
    w_out = bp["mlp"]["c_proj"]["weight"].astype(dtype)
    wc = _wc(bp, config, dtype)
    G = w_out @ w_out.T
    return {"G": G, "M": G * (wc.T @ wc)}


def mlp_frobenius_gram(bp, config, h, grams=None):
    """Exact ||d mlp_out / d resid_mid||_F at h [N, d] -> [N] (see issue 4's derivation)."""
    grams = grams if grams is not None else mlp_grams(bp, config, h.dtype)
    G, M = grams["G"].astype(h.dtype), grams["M"].astype(h.dtype)
    if config.ln_mode == "identity":
        u, y, s = h, None, None
    else:
        w, b = bp["ln_2"]["weight"].astype(h.dtype), bp["ln_2"]["bias"].astype(h.dtype)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        s = jnp.sqrt(var + config.layer_norm_epsilon)
        y = (h - mean) / s
        u = y * w + b
    fc = bp["mlp"]["c_fc"]
    pre = u @ fc["weight"].astype(h.dtype) + fc["bias"].astype(h.dtype)
    g = jax.jvp(gelu_new, (pre,), (jnp.ones_like(pre),))[1]
    sq = jnp.sum((g @ M) * g, axis=-1)
    if config.ln_mode != "identity":
        d = h.shape[-1]
        q = y @ _wc(bp, config, h.dtype)
        beta = (2.0 - jnp.sum(y * y, axis=-1) / d) / d
        gq = g * q
        sq = (sq - beta * jnp.sum((gq @ G) * gq, axis=-1)) / jnp.square(s[..., 0])
    return jnp.sqrt(jnp.maximum(sq, 0.0))
