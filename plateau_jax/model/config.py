"""Model architecture, in family-neutral terms, and the presets of the released GPT-2 sizes.

One :class:`ModelConfig` describes every supported family (GPT-2, GPT-NeoX, Llama-style), with
the switches a family needs: LayerNorm or RMSNorm, learned or rotary positions, grouped-query
attention, gated MLPs, a parallel residual. Each family's module in
:mod:`plateau_jax.model.families` translates a HuggingFace ``config.json`` into it and refuses, in
one error that lists them all, the features we do not implement.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

LN_MODES = ("normal", "identity")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu")
POSITIONALS = ("learned", "rotary")

_GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600),
}


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for an architecture feature this package does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (hashable: a static jit argument).

    Attributes:
      family: checkpoint family, which fixes the on-disk names ("gpt2", "gpt_neox", "llama").
      vocab_size: number of token embeddings V.
      n_positions: maximum sequence length.
      d_model: residual width.
      n_layer: number of blocks.
      n_head: query heads; ``n_kv_head`` key/value heads (grouped-query attention when fewer;
        default ``n_head``); ``d_head`` per-head width (default ``d_model // n_head``).
      d_mlp: MLP hidden width.
      norm: "layernorm" (mean and variance; weight and bias) or "rmsnorm" (weight only).
      norm_eps: the norms' epsilon.
      ln_mode: "normal", or "identity": every norm is the identity (the study's treatment of
        LayerNorm-free checkpoints).
      act: MLP activation: "gelu_new" (GPT-2's tanh GELU), "gelu", "silu", "relu".
      gated_mlp: ``act(x W_gate) * (x W_in)`` (SwiGLU-style) instead of ``act(x W_in)``.
      positional: "learned" (absolute position embeddings) or "rotary".
      rotary_dim: leading dimensions of each head that rotate (rotary only).
      rotary_base: rotary frequency base (``rope_theta``).
      rope_scaling: rotary frequency scaling as sorted ``(key, value)`` pairs; empty for none.
      parallel_residual: ``resid_post = resid_pre + attn(ln1(x)) + mlp(ln2(x))`` (no resid_mid).
      attn_bias, attn_out_bias, mlp_bias: whether Q/K/V, the attention output and the MLP have
        biases.
      scale_attn: divide attention scores by sqrt(d_head).
      tie_embeddings: the unembedding is ``W_E.T`` (no separate ``unembed`` params).
    """

    family: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_mlp: int = 3072
    n_kv_head: Optional[int] = None
    d_head: Optional[int] = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    ln_mode: str = "normal"
    act: str = "gelu_new"
    gated_mlp: bool = False
    positional: str = "learned"
    rotary_dim: int = 0
    rotary_base: float = 10000.0
    rope_scaling: Tuple[Tuple[str, object], ...] = ()
    parallel_residual: bool = False
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    scale_attn: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "d_model", "n_layer", "n_head", "d_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_head is None:
            if self.d_model % self.n_head:
                raise UnsupportedConfigError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; give d_head.")
            object.__setattr__(self, "d_head", self.d_model // self.n_head)
        if self.n_head % self.n_kv_head:
            raise UnsupportedConfigError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}.")
        for name, value, allowed in (("ln_mode", self.ln_mode, LN_MODES),
                                     ("norm", self.norm, NORMS), ("act", self.act, ACTIVATIONS),
                                     ("positional", self.positional, POSITIONALS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}.")
        if self.positional == "rotary" and not (0 < self.rotary_dim <= self.d_head
                                                and self.rotary_dim % 2 == 0):
            raise UnsupportedConfigError(
                f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={self.d_head}].")

    # Derived sizes -------------------------------------------------------------------------

    @property
    def n_embd(self) -> int:
        """GPT-2's name for ``d_model``."""
        return self.d_model

    @property
    def has_resid_mid(self) -> bool:
        """Sequential blocks have ``hook_resid_mid``; parallel-residual blocks do not."""
        return not self.parallel_residual

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # Constructors --------------------------------------------------------------------------

    @classmethod
    def gpt2(cls, **kw) -> "ModelConfig":
        """A GPT-2 architecture; ``d_mlp`` defaults to ``4 * d_model``."""
        kw.setdefault("d_mlp", 4 * kw.get("d_model", cls.d_model))
        return cls(family="gpt2", **kw)

    @classmethod
    def gpt_neox(cls, **kw) -> "ModelConfig":
        """A GPT-NeoX (Pythia) architecture: LayerNorm, rotary on a quarter of each head
        (``rotary_dim`` default ``d_head // 4``, rounded to even), parallel residual, exact
        GELU, untied unembedding; ``d_mlp`` defaults to ``4 * d_model``."""
        d = kw.get("d_model", cls.d_model)
        kw.setdefault("d_mlp", 4 * d)
        d_head = kw.get("d_head") or d // kw.get("n_head", cls.n_head)
        kw.setdefault("rotary_dim", max(2, d_head // 4 // 2 * 2))
        defaults = dict(positional="rotary", parallel_residual=True, act="gelu",
                        tie_embeddings=False, n_positions=2048)
        return cls(family="gpt_neox", **{**defaults, **kw})

    @classmethod
    def llama(cls, **kw) -> "ModelConfig":
        """A Llama-style architecture: RMSNorm, rotary on the whole head, SwiGLU MLP, no
        biases, untied unembedding (``attn_bias=True, attn_out_bias=False`` is Qwen2's)."""
        d_head = kw.get("d_head") or kw.get("d_model", cls.d_model) // kw.get("n_head", cls.n_head)
        defaults = dict(norm="rmsnorm", norm_eps=1e-6, act="silu", gated_mlp=True,
                        positional="rotary", rotary_dim=d_head, attn_bias=False,
                        attn_out_bias=False, mlp_bias=False, tie_embeddings=False,
                        n_positions=2048)
        return cls(family="llama", **{**defaults, **kw})

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """The architecture of a released GPT-2 size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")."""
        if name not in _GPT2_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(_GPT2_PRESETS)}.")
        return cls.gpt2(**{**_GPT2_PRESETS[name], **overrides})

    @classmethod
    def from_hf_dict(cls, raw, *, ln_mode: str = "auto") -> "ModelConfig":
        """The config of a HuggingFace ``config.json`` (dispatch on ``model_type``)."""
        from plateau_jax.model import families
        return families.for_hf_config(raw).config_from_hf(raw, ln_mode=ln_mode)

    def to_hf_dict(self) -> dict:
        """A ``config.json`` dict that transformers and our loader both read."""
        from plateau_jax.model import families
        return families.get(self.family).config_to_hf(self)


# The name the first release used; ``GPT2Config.preset("gpt2-large")`` keeps working.
GPT2Config = ModelConfig
