"""The arithmetic of one block, as pure functions of one layer's params.

Every activation passes through ``hook(local_site_name, value) -> value`` (see
:mod:`plateau_jax.model.sites`), which is where the core records and patches. Shapes: ``B``
batch, ``S`` new positions (a causal sequence, or independent next-token rows that share a
cached context), ``d`` d_model, ``H``/``Hkv`` query/key-value heads, ``k`` d_head, ``m`` d_mlp.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from plateau_jax.model.config import ModelConfig

Array = jax.Array
Hook = Callable[[str, Array], Array]


def no_hook(name: str, value: Array) -> Array:
    return value


def gelu_new(x: Array) -> Array:
    """GPT-2's tanh approximation of GELU (HF ``gelu_new``)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {"gelu_new": gelu_new, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "silu": jax.nn.silu, "relu": jax.nn.relu}


def norm(p, x: Array, cfg: ModelConfig) -> Array:
    """LayerNorm (biased variance, HF numerics) or RMSNorm over the last axis, statistics in at
    least float32; the identity when ``cfg.ln_mode == "identity"``."""
    if cfg.ln_mode == "identity":
        return x
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if cfg.norm == "layernorm":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + cfg.norm_eps))
    y = y.astype(x.dtype) * p["w"].astype(x.dtype)
    return y + p["b"].astype(x.dtype) if "b" in p else y


# ----------------------------------------------------------------------------- rotary

def _inv_freq(cfg: ModelConfig) -> Array:
    rot = cfg.rotary_dim
    inv = 1.0 / (cfg.rotary_base ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor",
                                                         "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where((wavelen >= old / high) & (wavelen <= old / low), mid, scaled)
    return inv


def rotate(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Rotary embedding of the first ``rotary_dim`` dims of each head (NeoX/Llama "rotate half"
    layout). ``x`` ``[B, S, heads, k]``, ``positions`` int ``[B, S]``."""
    rot = cfg.rotary_dim
    angles = positions.astype(jnp.float32)[..., None] * _inv_freq(cfg)  # [B, S, rot/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xr, rest = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (xr * cos.astype(x.dtype) + rotated * sin.astype(x.dtype))
    return jnp.concatenate([out, rest], axis=-1)


# ----------------------------------------------------------------------------- attention

class Context(NamedTuple):
    """One layer's cached keys/values of a shared context: ``keys``/``values``
    ``[B, Hkv, T, k]``, ``mask`` ``[B, T]`` (False marks right padding)."""

    keys: Array
    values: Array
    mask: Array


def _project(x, w, b=None):
    y = jnp.einsum("bsd,hdk->bshk", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def attention(p, h: Array, cfg: ModelConfig, *, positions: Array, context: Optional[Context],
              hook: Hook = no_hook) -> Tuple[Array, Optional[Tuple[Array, Array]]]:
    """Multi-head (grouped-query) attention of normalised input ``h`` ``[B, S, d]``.

    With ``context=None`` the S positions form one causal sequence; the keys/values
    ``[B, Hkv, S, k]`` are returned for caching. With a ``context``, each of the S rows is an
    independent next token (at ``positions``) that attends to the context and to itself only;
    nothing is returned for caching. Sites: ``attn.hook_q/k/v`` ``[B, S, heads, k]``,
    ``attn.hook_pattern`` ``[B, H, S, keys]``, ``attn.hook_z`` ``[B, S, H, k]``.
    Returns (attention output ``[B, S, d]``, keys/values or None).
    """
    B, S, _ = h.shape
    H, Hkv, k = cfg.n_head, cfg.n_kv_head, cfg.d_head
    G = H // Hkv
    q = _project(h, p["W_Q"], p.get("b_Q"))
    kk = _project(h, p["W_K"], p.get("b_K"))
    v = _project(h, p["W_V"], p.get("b_V"))
    if cfg.positional == "rotary":
        q, kk = rotate(q, positions, cfg), rotate(kk, positions, cfg)
    q, kk, v = hook("attn.hook_q", q), hook("attn.hook_k", kk), hook("attn.hook_v", v)
    sdt = jnp.promote_types(h.dtype, jnp.float32)  # scores in >= float32
    scale = 1.0 / math.sqrt(k) if cfg.scale_attn else 1.0
    qg = q.reshape(B, S, Hkv, G, k)
    if context is None:
        scores = jnp.einsum("bsngk,btnk->bngst", qg, kk).astype(sdt) * scale
        causal = jnp.tril(jnp.ones((S, S), bool))
        scores = jnp.where(causal, scores, jnp.finfo(sdt).min)
    else:
        ctx = jnp.einsum("bsngk,bntk->bngst", qg, context.keys.astype(h.dtype)).astype(sdt)
        own = jnp.einsum("bsngk,bsnk->bngs", qg, kk).astype(sdt)[..., None]
        ctx = jnp.where(context.mask[:, None, None, None, :], ctx * scale, jnp.finfo(sdt).min)
        scores = jnp.concatenate([ctx, own * scale], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(h.dtype)  # [B, Hkv, G, S, keys]
    pattern = hook("attn.hook_pattern", probs.reshape(B, H, S, probs.shape[-1]))
    probs = pattern.reshape(probs.shape)
    if context is None:
        z = jnp.einsum("bngst,btnk->bsngk", probs, v)
    else:
        z = (jnp.einsum("bngst,bntk->bsngk", probs[..., :-1], context.values.astype(h.dtype))
             + jnp.einsum("bngs,bsnk->bsngk", probs[..., -1], v))
    z = hook("attn.hook_z", z.reshape(B, S, H, k))
    out = jnp.einsum("bshk,hkd->bsd", z, p["W_O"].astype(h.dtype))
    if "b_O" in p:
        out = out + p["b_O"].astype(h.dtype)
    kv = None if context is not None else (kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out, kv


# ----------------------------------------------------------------------------- MLP

def mlp(p, h: Array, cfg: ModelConfig, hook: Hook = no_hook) -> Array:
    """``W_out act(h W_in + b_in) + b_out``, or the gated form ``act(h W_gate) * (h W_in)``.

    Sites: ``mlp.hook_pre`` (the activation's input: the gate for gated MLPs),
    ``mlp.hook_pre_linear`` (gated only: the linear branch), ``mlp.hook_post`` ``[B, S, m]``.
    """
    act = ACTIVATIONS[cfg.act]

    def dense(w, b):
        y = h @ p[w].astype(h.dtype)
        return y + p[b].astype(h.dtype) if b in p else y

    if cfg.gated_mlp:
        pre = hook("mlp.hook_pre", dense("W_gate", "b_gate"))
        lin = hook("mlp.hook_pre_linear", dense("W_in", "b_in"))
        post = hook("mlp.hook_post", act(pre) * lin)
    else:
        pre = hook("mlp.hook_pre", dense("W_in", "b_in"))
        post = hook("mlp.hook_post", act(pre))
    out = post @ p["W_out"].astype(h.dtype)
    return out + p["b_out"].astype(h.dtype) if "b_out" in p else out


# ----------------------------------------------------------------------------- block parts

def attn_part(bp, x: Array, cfg: ModelConfig, *, positions: Array, context: Optional[Context],
              hook: Hook = no_hook):
    """``hook_attn_out`` of residual input ``x`` (ln1 included) and the keys/values (or None)."""
    h = hook("ln1.hook_normalized", norm(bp["ln1"], x, cfg))
    out, kv = attention(bp["attn"], h, cfg, positions=positions, context=context, hook=hook)
    return hook("hook_attn_out", out), kv


def mlp_part(bp, x: Array, cfg: ModelConfig, hook: Hook = no_hook,
             mlp_fn: Optional[Callable[[Array], Array]] = None) -> Array:
    """``hook_mlp_out`` of residual input ``x`` (ln2 included); ``mlp_fn`` replaces the MLP
    itself (``ln2_normalized -> mlp_out``)."""
    h = hook("ln2.hook_normalized", norm(bp["ln2"], x, cfg))
    return hook("hook_mlp_out", mlp(bp["mlp"], h, cfg, hook) if mlp_fn is None else mlp_fn(h))


def block(bp, x: Array, cfg: ModelConfig, *, positions: Array, context: Optional[Context],
          hook: Hook = no_hook):
    """One whole block: ``resid_pre`` -> ``resid_post`` (sequential or parallel residual).
    Returns (resid_post, keys/values or None)."""
    a, kv = attn_part(bp, x, cfg, positions=positions, context=context, hook=hook)
    if cfg.parallel_residual:
        return x + a + mlp_part(bp, x, cfg, hook), kv
    mid = hook("hook_resid_mid", x + a)
    return mid + mlp_part(bp, mid, cfg, hook), kv
