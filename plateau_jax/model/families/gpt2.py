"""GPT-2 checkpoints (``model_type: gpt2``): config translation and tensor layout.

On disk (HF, Conv1D weights stored ``[in, out]``)::

    wte.weight [V, d]   wpe.weight [P, d]   ln_f.{weight,bias} [d]   lm_head.weight [V, d] (untied)
    h.{i}.ln_1 / ln_2 .{weight,bias} [d]
    h.{i}.attn.c_attn.weight [d, 3d] (q | k | v, heads contiguous), .bias [3d]
    h.{i}.attn.c_proj.weight [d, d], .bias [d]
    h.{i}.mlp.c_fc.weight [d, m], .bias [m];  h.{i}.mlp.c_proj.weight [m, d], .bias [d]

In memory: the canonical tree of :mod:`plateau_jax.model.params`.
"""

from __future__ import annotations

import re
from typing import List

import numpy as np

from plateau_jax.model.config import ModelConfig, UnsupportedConfigError
from plateau_jax.model.families.rules import TensorRule, rule, transposed

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.", "")
# Causal-mask buffers some checkpoints carry.
IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
ALIASES: dict = {}
# Old checkpoints store the tied lm_head too.
TIED_KEY = "lm_head.weight"
# Activation names that all mean the tanh approximation of GELU used by GPT-2.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# A LayerNorm-free checkpoint encodes the removal as a huge epsilon.
LN_FREE_EPS = 1e3


def config_from_hf(raw, *, ln_mode: str = "auto") -> ModelConfig:
    """A :class:`ModelConfig` from a GPT-2 ``config.json`` dict.

    Every feature we do not implement is collected and refused in one error. ``ln_mode="auto"``
    picks the mode that :func:`plateau_jax.save_model` recorded, else "identity" for
    LayerNorm-free checkpoints (``layer_norm_epsilon >= 1e3``), else "normal".
    """
    problems = []
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELU_NAMES:
        problems.append(f"activation_function={act!r} (only the tanh GELU: {TANH_GELU_NAMES})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention", "is_encoder_decoder"):
        if raw.get(flag, False):
            problems.append(f"{flag}=True")
    if problems:
        raise UnsupportedConfigError(
            "This GPT-2 config uses features plateau_jax does not implement: " + "; ".join(problems)
            + ". Use a standard GPT-2 checkpoint or edit config.json if these are unintended.")
    if ln_mode not in ("auto", "normal", "identity"):
        raise ValueError(f"ln_mode={ln_mode!r}: expected 'auto', 'normal' or 'identity'.")
    d_model = int(raw.get("n_embd", raw.get("hidden_size", 768)))
    eps = float(raw.get("layer_norm_epsilon", 1e-5))
    if ln_mode == "auto":
        ln_mode = raw.get("plateau_jax_ln_mode") or ("identity" if eps >= LN_FREE_EPS else "normal")
    n_inner = raw.get("n_inner")
    return ModelConfig(
        family="gpt2",
        vocab_size=int(raw.get("vocab_size", 50257)),
        n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
        d_model=d_model,
        n_layer=int(raw.get("n_layer", 12)),
        n_head=int(raw.get("n_head", 12)),
        d_mlp=int(n_inner) if n_inner is not None else 4 * d_model,
        norm_eps=eps,
        ln_mode=ln_mode,
        scale_attn=bool(raw.get("scale_attn_weights", True)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A GPT-2 ``config.json`` dict that transformers' GPT2Config and our loader both read."""
    if cfg.family != "gpt2":
        raise ValueError(f"config of family {cfg.family!r} is not a GPT-2 config.")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_mlp,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": cfg.scale_attn,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": cfg.vocab_size - 1,
        "eos_token_id": cfg.vocab_size - 1,
        # Read back by config_from_hf(ln_mode="auto"); ignored by transformers.
        "plateau_jax_ln_mode": cfg.ln_mode,
    }


def _qkv(which: str, H: int, dh: int, d: int):
    """split/join of ``c_attn`` weight [d, 3d] or bias [3d] into per-head Q, K, V."""
    paths = [("blocks", "attn", f"{which}_{x}") for x in "QKV"]
    if which == "W":
        split = lambda a: {p: a.reshape(d, 3, H, dh)[:, j].transpose(1, 0, 2)
                           for j, p in enumerate(paths)}
        join = lambda get: np.concatenate([get(p).transpose(1, 0, 2).reshape(d, H * dh)
                                           for p in paths], axis=1)
    else:
        split = lambda a: {p: a.reshape(3, H, dh)[j] for j, p in enumerate(paths)}
        join = lambda get: np.concatenate([get(p).reshape(H * dh) for p in paths])
    return split, join


def tensor_rules(cfg: ModelConfig) -> List[TensorRule]:
    """Every tensor a GPT-2 checkpoint with this config holds (see the module docstring)."""
    d, m, H, dh, V = cfg.d_model, cfg.d_mlp, cfg.n_head, cfg.d_head, cfg.vocab_size
    rules = [rule("wte.weight", (V, d), ("embed", "W_E")),
             rule("wpe.weight", (cfg.n_positions, d), ("pos_embed", "W_pos")),
             rule("ln_f.weight", (d,), ("ln_final", "w")),
             rule("ln_f.bias", (d,), ("ln_final", "b"))]
    if not cfg.tie_embeddings:
        rules.append(rule("lm_head.weight", (V, d), ("unembed", "W_U"), transposed))
    for hf, ln in (("ln_1", "ln1"), ("ln_2", "ln2")):
        rules += [rule(f"h.{{i}}.{hf}.weight", (d,), ("blocks", ln, "w")),
                  rule(f"h.{{i}}.{hf}.bias", (d,), ("blocks", ln, "b"))]
    for which, shape in (("W", (d, 3 * d)), ("b", (3 * d,))):
        split, join = _qkv(which, H, dh, d)
        rules.append(TensorRule(f"h.{{i}}.attn.c_attn.{'weight' if which == 'W' else 'bias'}",
                                shape, split, join))
    o = ("blocks", "attn", "W_O")
    rules += [TensorRule("h.{i}.attn.c_proj.weight", (d, d),
                         lambda a: {o: a.reshape(H, dh, d)}, lambda get: get(o).reshape(H * dh, d)),
              rule("h.{i}.attn.c_proj.bias", (d,), ("blocks", "attn", "b_O")),
              rule("h.{i}.mlp.c_fc.weight", (d, m), ("blocks", "mlp", "W_in")),
              rule("h.{i}.mlp.c_fc.bias", (m,), ("blocks", "mlp", "b_in")),
              rule("h.{i}.mlp.c_proj.weight", (m, d), ("blocks", "mlp", "W_out")),
              rule("h.{i}.mlp.c_proj.bias", (d,), ("blocks", "mlp", "b_out"))]
    return rules


def save_prefix(key: str) -> str:
    """The prefix saved checkpoints put before ``key`` (transformers' own GPT-2 layout)."""
    return "" if key.startswith("lm_head") else "transformer."
