"""GPT-2 configuration: read from a HuggingFace ``config.json``, refuse what we do not implement."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Activation names that all mean the tanh approximation of GELU used by GPT-2.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

LN_MODES = ("normal", "identity")

_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for a GPT-2 variant this package does not implement."""


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model (hashable, so it can be a static jit argument).

    Attributes:
      vocab_size: number of token embeddings V.
      n_positions: maximum sequence length.
      n_embd: residual width d_model.
      n_layer: number of transformer blocks.
      n_head: attention heads; d_head = n_embd // n_head.
      n_inner: MLP width d_mlp (HF's ``n_inner``; ``None`` in config.json means 4 * n_embd).
      layer_norm_epsilon: LayerNorm eps.
      ln_mode: "normal" (HF numerics) or "identity" (every LayerNorm is the identity, as the
        study did for LayerNorm-free checkpoints).
      scale_attn_weights: divide attention scores by sqrt(d_head) (HF default True).
      tie_word_embeddings: logits use ``wte``; otherwise a separate ``lm_head`` is expected.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072
    layer_norm_epsilon: float = 1e-5
    ln_mode: str = "normal"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UnsupportedConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")
        if self.ln_mode not in LN_MODES:
            raise ValueError(f"ln_mode={self.ln_mode!r}: expected one of {LN_MODES}.")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")

    @property
    def d_model(self) -> int:
        return self.n_embd

    @property
    def d_mlp(self) -> int:
        return self.n_inner

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """The architecture of a released GPT-2 size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(_PRESETS)}.")
        kw = dict(_PRESETS[name])
        kw["n_inner"] = 4 * kw["n_embd"]
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, ln_mode: str = "auto") -> "GPT2Config":
        """Builds a config from the contents of a HF GPT-2 ``config.json``.

        Every feature we do not implement is collected and refused in one error.
        ``ln_mode="auto"`` picks the mode a checkpoint saved by :func:`save_gpt2` recorded, else
        "identity" for LayerNorm-free checkpoints, which encode the removal as a huge
        ``layer_norm_epsilon`` (>= 1e3), and "normal" otherwise.
        """
        problems = []
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            problems.append(f"model_type={model_type!r} (only 'gpt2')")
        act = raw.get("activation_function", "gelu_new")
        if act not in TANH_GELU_NAMES:
            problems.append(f"activation_function={act!r} (only the tanh GELU: {TANH_GELU_NAMES})")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "add_cross_attention", "is_encoder_decoder"):
            if raw.get(flag, False):
                problems.append(f"{flag}=True")
        if problems:
            raise UnsupportedConfigError(
                "This GPT-2 config uses features plateau_jax does not implement: "
                + "; ".join(problems)
                + ". Use a standard GPT-2 checkpoint or edit config.json if these are unintended.")
        n_embd = int(raw.get("n_embd", raw.get("hidden_size", 768)))
        eps = float(raw.get("layer_norm_epsilon", 1e-5))
        if ln_mode == "auto":
            ln_mode = raw.get("plateau_jax_ln_mode") or ("identity" if eps >= 1e3 else "normal")
        n_inner = raw.get("n_inner")
        return cls(
            vocab_size=int(raw.get("vocab_size", 50257)),
            n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            n_embd=n_embd,
            n_layer=int(raw.get("n_layer", 12)),
            n_head=int(raw.get("n_head", 12)),
            n_inner=int(n_inner) if n_inner is not None else 4 * n_embd,
            layer_norm_epsilon=eps,
            ln_mode=ln_mode,
            scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, ln_mode: str = "auto") -> "GPT2Config":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), ln_mode=ln_mode)

    def to_hf_dict(self) -> dict:
        """A ``config.json`` dict that transformers' GPT2Config and our loader both read."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "tie_word_embeddings": self.tie_word_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
            # Read back by from_hf_dict(ln_mode="auto"); ignored by transformers.
            "plateau_jax_ln_mode": self.ln_mode,
        }
