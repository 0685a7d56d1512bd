"""GPT-2 as Flax linen modules, with parameters named as in the HuggingFace checkpoint.

Param tree (HF key ``h.3.attn.c_attn.weight`` is ``params["h"]["3"]["attn"]["c_attn"]["weight"]``)::

    wte/weight [V, d]      wpe/weight [n_positions, d]      ln_f/{weight,bias} [d]
    h/{i}/ln_1, ln_2       {weight, bias} [d]
    h/{i}/attn/c_attn      weight [d, 3d], bias [3d]      (HF Conv1D layout: [in, out])
    h/{i}/attn/c_proj      weight [d, d],  bias [d]
    h/{i}/mlp/c_fc         weight [d, d_mlp], bias [d_mlp]
    h/{i}/mlp/c_proj       weight [d_mlp, d], bias [d]
    lm_head/weight [V, d]  only when ``config.tie_word_embeddings`` is False (untied checkpoints,
                           and weights centred by the loader, whose unembedding stays uncentred)

Every module takes a :class:`Hooks` object through which each activation site passes: that is
where activations are recorded and where patches replace them. Hooks are plain Python built
while tracing, so a call stays pure and composes with ``jit``, ``vmap`` and ``jacfwd``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from plateau_jax.model.config import GPT2Config

Array = jax.Array
KV = Tuple[Array, Array]  # keys, values: [batch, n_head, positions, d_head] each.


def gelu_new(x: Array) -> Array:
    """GPT-2's tanh approximation of GELU (HF ``gelu_new``)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Hooks:
    """Records and patches activation sites during one traced call.

    Args:
      sites: full site names (``blocks.3.hook_resid_post``) to record.
      patches: full site name -> replacement. A value of shape ``[batch, X]`` (or ``[X]``)
        replaces the site at the last position only; one of the site's full shape
        ``[batch, seq, X]`` replaces every position.
    """

    def __init__(self, sites=(), patches: Optional[Mapping[str, Array]] = None):
        self.sites = frozenset(sites)
        self.patches = dict(patches or {})
        self.records: dict = {}
        self.patched: set = set()

    def __call__(self, name: str, value: Array) -> Array:
        if name in self.patches:
            self.patched.add(name)
            new = jnp.asarray(self.patches[name], value.dtype)
            if new.ndim == value.ndim:
                value = jnp.broadcast_to(new, value.shape)
            else:
                value = value.at[..., -1, :].set(jnp.broadcast_to(new, value[..., -1, :].shape))
        if name in self.sites:
            self.records[name] = value
        return value


def _dense_init(std=0.02):
    return nn.initializers.normal(stddev=std)


class Conv1D(nn.Module):
    """HF's Conv1D: ``y = x @ weight + bias`` with ``weight`` stored as ``[in, out]``."""

    features: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("weight", _dense_init(self.init_std), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ w.astype(x.dtype) + b.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with HF numerics (biased variance), or the identity when ``mode="identity"``.

    In identity mode the weight and bias are still declared (so checkpoints load) but unused.
    """

    eps: float
    mode: str = "normal"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        b = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        if self.mode == "identity":
            return x
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in >= float32
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * w.astype(x.dtype) + b.astype(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention, attending over ``past_kv`` then the new positions.

    Input ``x`` [batch, T, d] (already layer-normed). ``past_kv`` holds the keys/values of
    earlier positions ([batch or 1, H, T_past, d_head] each); ``past_mask`` [batch or 1, T_past]
    marks which of them are real (padding is False). Returns (attn_out [batch, T, d],
    keys/values of the new positions).
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, hooks: Hooks, prefix: str, past_kv: Optional[KV] = None,
                 past_mask: Optional[Array] = None) -> Tuple[Array, KV]:
        cfg = self.config
        B, T, d = x.shape
        H, dh = cfg.n_head, cfg.d_head
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)
        qkv = Conv1D(3 * d, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(B, T, H, dh).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        new_kv = (k, v)
        n_past = 0
        if past_kv is not None:
            pk, pv = past_kv
            n_past = pk.shape[2]
            k = jnp.concatenate([jnp.broadcast_to(pk, (B,) + pk.shape[1:]).astype(k.dtype), k], 2)
            v = jnp.concatenate([jnp.broadcast_to(pv, (B,) + pv.shape[1:]).astype(v.dtype), v], 2)
        # float32 at least (bf16/f16 models), float64 kept for float64 checks.
        sdt = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(sdt)
        if cfg.scale_attn_weights:
            scores = scores / math.sqrt(dh)
        allowed = jnp.arange(n_past + T)[None, :] <= (n_past + jnp.arange(T))[:, None]
        allowed = allowed[None, None]
        if past_mask is not None:
            pm = jnp.concatenate([jnp.broadcast_to(past_mask, (B, n_past)),
                                  jnp.ones((B, T), bool)], axis=1)
            allowed = allowed & pm[:, None, None, :]
        scores = jnp.where(allowed, scores, jnp.finfo(sdt).min)
        pattern = hooks(prefix + "attn.hook_pattern", jax.nn.softmax(scores, axis=-1).astype(x.dtype))
        z = jnp.einsum("bhqk,bhkd->bhqd", pattern, v).transpose(0, 2, 1, 3).reshape(B, T, d)
        return Conv1D(d, init_std=std_proj, name="c_proj")(z), new_kv


class MLP(nn.Module):
    """``c_proj(gelu_new(c_fc(x)))``; records ``mlp.hook_pre`` and ``mlp.hook_post``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, hooks: Hooks, prefix: str) -> Array:
        cfg = self.config
        pre = hooks(prefix + "mlp.hook_pre", Conv1D(cfg.n_inner, name="c_fc")(x))
        post = hooks(prefix + "mlp.hook_post", gelu_new(pre))
        return Conv1D(cfg.n_embd, init_std=0.02 / math.sqrt(2 * cfg.n_layer), name="c_proj")(post)


class Block(nn.Module):
    """One pre-LayerNorm transformer block (HF ``h.{layer}``).

    ``start`` lets a call begin half-way: "resid_pre" runs the whole block; "resid_mid" treats
    ``x`` as ``hook_resid_mid`` and runs only the MLP half (attention is skipped, so no keys or
    values are produced). Returns (resid_post [batch, T, d], new keys/values or None).
    """

    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x: Array, hooks: Hooks, past_kv: Optional[KV] = None,
                 past_mask: Optional[Array] = None, start: str = "resid_pre",
                 mlp_fn: Optional[Callable[[Array], Array]] = None):
        cfg = self.config
        p = f"blocks.{self.layer}."
        ln_1 = LayerNorm(cfg.layer_norm_epsilon, cfg.ln_mode, name="ln_1")
        attn = Attention(cfg, name="attn")
        ln_2 = LayerNorm(cfg.layer_norm_epsilon, cfg.ln_mode, name="ln_2")
        mlp = MLP(cfg, name="mlp")
        new_kv = None
        if start == "resid_pre":
            x = hooks(p + "hook_resid_pre", x)
            h = hooks(p + "ln1.hook_normalized", ln_1(x))
            a, new_kv = attn(h, hooks, p, past_kv, past_mask)
            x = hooks(p + "hook_resid_mid", x + hooks(p + "hook_attn_out", a))
        elif start == "resid_mid":
            x = hooks(p + "hook_resid_mid", x)
            if self.is_initializing():  # declare attention params all the same
                attn(ln_1(x), hooks, p)
        else:
            raise ValueError(f"Block start must be 'resid_pre' or 'resid_mid', got {start!r}.")
        h = hooks(p + "ln2.hook_normalized", ln_2(x))
        m = mlp_fn(h) if mlp_fn is not None else mlp(h, hooks, p)
        if mlp_fn is not None and self.is_initializing():
            mlp(h, hooks, p)
        x = hooks(p + "hook_resid_post", x + hooks(p + "hook_mlp_out", m))
        return x, new_kv


class Embed(nn.Module):
    """A lookup table with HF's param name ``weight`` [num, features]."""

    num: int
    features: int
    init_std: float = 0.02

    def setup(self):
        self.weight = self.param("weight", _dense_init(self.init_std), (self.num, self.features))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight, ids, axis=0)


class Blocks(nn.Module):
    """Container that owns blocks ``h/0 .. h/{n_layer-1}`` (used for init and plain apply)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, hooks: Hooks):
        for i in range(self.config.n_layer):
            x, _ = Block(self.config, i, name=str(i))(x, hooks)
        return x


class GPT2LMHead(nn.Module):
    """The whole model: token ids [batch, T] -> logits [batch, T, V].

    ``init`` creates the full HF-named param tree (with ``lm_head`` only if the config is
    untied). For recording, patching, swapping and continuation use :func:`plateau_jax.forward`
    and friends, which run the same :class:`Block` modules one at a time.
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, ids: Array, hooks: Optional[Hooks] = None) -> Array:
        cfg = self.config
        hooks = hooks if hooks is not None else Hooks()
        T = ids.shape[-1]
        tok = hooks("hook_embed", Embed(cfg.vocab_size, cfg.n_embd, name="wte")(ids))
        pos = hooks("hook_pos_embed",
                    Embed(cfg.n_positions, cfg.n_embd, init_std=0.01, name="wpe")(jnp.arange(T))[None])
        x = Blocks(cfg, name="h")(tok + pos, hooks)
        x = hooks("ln_final.hook_normalized",
                  LayerNorm(cfg.layer_norm_epsilon, cfg.ln_mode, name="ln_f")(x))
        if cfg.tie_word_embeddings:
            w_u = self.variables["params"]["wte"]["weight"]
        else:
            w_u = Embed(cfg.vocab_size, cfg.n_embd, name="lm_head").weight
        return x @ w_u.T.astype(x.dtype)
