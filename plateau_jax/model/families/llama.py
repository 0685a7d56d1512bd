"""Llama-style checkpoints (``model_type`` llama, qwen2, mistral; Llama, Qwen2, SmolLM,
TinyLlama, ...): config translation and tensor layout.

Architecture: RMSNorm (weight only), rotary embeddings on the whole head ("rotate half" layout,
``rope_theta``, optional linear or llama3 frequency scaling), grouped-query attention
(``num_key_value_heads``), a SwiGLU MLP ``down(act(gate(x)) * up(x))``, a sequential residual.
Biases: Llama has Q/K/V *and* output biases when ``attention_bias`` and MLP biases when
``mlp_bias``; Qwen2 always has Q/K/V biases and no others; Mistral none. Mistral is read only
when its sliding window never binds (``sliding_window`` null or >= ``max_position_embeddings``);
Qwen2 with ``use_sliding_window`` is refused.

On disk (``torch.nn.Linear`` weights ``[out, in]``; body keys under ``model.``)::

    embed_tokens.weight [V, d]    norm.weight [d]    lm_head.weight [V, d] (untied only)
    layers.{i}.input_layernorm.weight [d]    layers.{i}.post_attention_layernorm.weight [d]
    layers.{i}.self_attn.q_proj.weight [H k, d]    k_proj / v_proj.weight [Hkv k, d]  (+ .bias)
    layers.{i}.self_attn.o_proj.weight [d, H k]  (+ .bias)
    layers.{i}.mlp.gate_proj / up_proj.weight [m, d]    mlp.down_proj.weight [d, m]  (+ .bias)

Canonical names: ``gate_proj`` is ``W_gate`` (``mlp.hook_pre`` is its output, as in
TransformerLens), ``up_proj`` is ``W_in`` (``mlp.hook_pre_linear``), ``down_proj`` is ``W_out``.
Old checkpoints' ``rotary_emb.inv_freq`` buffers are ignored.
"""

from __future__ import annotations

import re
from typing import List

from plateau_jax.model.config import ModelConfig
from plateau_jax.model.families import hf_config
from plateau_jax.model.families.rules import TensorRule, head_bias, heads_in, heads_out, linear, rule

MODEL_TYPES = ("llama", "qwen2", "mistral")
PREFIXES = ("model.", "")
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
ALIASES: dict = {}
TIED_KEY = "lm_head.weight"
# transformers' defaults where they differ between the model types.
_KV_HEADS_DEFAULT = {"qwen2": 32, "mistral": 8}
_POSITIONS_DEFAULT = {"llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}


def _biases(raw, model_type: str):
    """(Q/K/V bias, output bias, MLP bias) as each model type's transformers class builds them."""
    if model_type == "qwen2":
        return True, False, False
    if model_type == "mistral":
        return False, False, False
    bias = bool(raw.get("attention_bias", False))
    return bias, bias, bool(raw.get("mlp_bias", False))


def config_from_hf(raw, *, ln_mode: str = "auto") -> ModelConfig:
    """A :class:`ModelConfig` from a Llama / Qwen2 / Mistral ``config.json`` dict (every
    unsupported feature refused in one error)."""
    model_type = raw.get("model_type", "llama")
    problems: List[str] = []
    hf_config.common_problems(raw, problems)
    act = hf_config.activation(raw, problems, default="silu")
    d_model, n_head = hf_config.need(raw, "hidden_size"), hf_config.need(raw, "num_attention_heads")
    n_positions = int(raw.get("max_position_embeddings", _POSITIONS_DEFAULT.get(model_type, 2048)))
    theta, partial, scaling = hf_config.rope(raw, problems, theta_key="rope_theta",
                                             partial_key="partial_rotary_factor",
                                             default_partial=None, n_positions=n_positions)
    if partial is not None and float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial} (Llama-style models here rotate the "
                        "whole head)")
    if model_type == "qwen2" and raw.get("use_sliding_window", False):
        problems.append("use_sliding_window=True (sliding-window attention)")
    window = raw.get("sliding_window") if model_type == "mistral" else None
    if window is not None and int(window) < n_positions:
        problems.append(f"sliding_window={window} < max_position_embeddings={n_positions} "
                        "(sliding-window attention)")
    hf_config.refuse(f"{model_type} (Llama-style)", problems)
    d_head = int(raw.get("head_dim") or d_model // n_head)
    n_kv = raw.get("num_key_value_heads")
    attn_bias, out_bias, mlp_bias = _biases(raw, model_type)
    return ModelConfig(
        family="llama",
        **hf_config.sizes(raw, n_positions),
        n_kv_head=int(n_kv) if n_kv is not None else _KV_HEADS_DEFAULT.get(model_type, n_head),
        d_head=d_head,
        d_mlp=hf_config.need(raw, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        ln_mode=hf_config.resolve_ln_mode(raw, ln_mode),
        act=act,
        gated_mlp=True,
        positional="rotary",
        rotary_dim=d_head,
        rotary_base=theta,
        rope_scaling=scaling,
        attn_bias=attn_bias,
        attn_out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def model_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` whose transformers class builds ``cfg``'s biases: "qwen2" for
    Q/K/V biases alone, else "llama"."""
    if cfg.attn_bias and not cfg.attn_out_bias and not cfg.mlp_bias:
        return "qwen2"
    return "llama"


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Llama or Qwen2 ``config.json`` dict (legacy key names, which every transformers version
    and our loader read)."""
    problems = []
    if cfg.family != "llama":
        problems.append(f"family {cfg.family!r}")
    for ok, what in ((cfg.norm == "rmsnorm", "LayerNorm"), (cfg.positional == "rotary", "learned positions"),
                     (cfg.rotary_dim == cfg.d_head, "partial rotary"), (cfg.gated_mlp, "an ungated MLP"),
                     (not cfg.parallel_residual, "a parallel residual"), (cfg.scale_attn, "unscaled attention")):
        if not ok:
            problems.append(what)
    mt = model_type(cfg)
    if mt == "llama" and cfg.attn_bias != cfg.attn_out_bias:
        problems.append("Q/K/V and output biases that differ (other than Qwen2's Q/K/V-only biases)")
    hf_config.check_representable("Llama-style", problems)
    out = {
        "model_type": mt,
        "architectures": ["Qwen2ForCausalLM" if mt == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_positions,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.d_head,
        "intermediate_size": cfg.d_mlp,
        "hidden_act": cfg.act,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": hf_config.hf_rope_scaling(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "plateau_jax_ln_mode": cfg.ln_mode,
    }
    if mt == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias)
    return out


def tensor_rules(cfg: ModelConfig) -> List[TensorRule]:
    """Every tensor a Llama-style checkpoint with this config holds (see the module docstring)."""
    d, m, H, Hkv, k, V = (cfg.d_model, cfg.d_mlp, cfg.n_head, cfg.n_kv_head, cfg.d_head,
                          cfg.vocab_size)
    att, mlp = "layers.{i}.self_attn", "layers.{i}.mlp"
    rules = [rule("embed_tokens.weight", (V, d), ("embed", "W_E")),
             rule("norm.weight", (d,), ("ln_final", "w")),
             rule("layers.{i}.input_layernorm.weight", (d,), ("blocks", "ln1", "w")),
             rule("layers.{i}.post_attention_layernorm.weight", (d,), ("blocks", "ln2", "w"))]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.weight", d, V, ("unembed", "W_U")))
    for x, n in (("q", H), ("k", Hkv), ("v", Hkv)):
        X = x.upper()
        rules.append(heads_in(f"{att}.{x}_proj.weight", n, k, d, ("blocks", "attn", f"W_{X}")))
        if cfg.attn_bias:
            rules.append(head_bias(f"{att}.{x}_proj.bias", n, k, ("blocks", "attn", f"b_{X}")))
    rules.append(heads_out(f"{att}.o_proj.weight", H, k, d, ("blocks", "attn", "W_O")))
    if cfg.attn_out_bias:
        rules.append(rule(f"{att}.o_proj.bias", (d,), ("blocks", "attn", "b_O")))
    for hf, ours, d_in, d_out, bias in (("gate_proj", "gate", d, m, "b_gate"),
                                         ("up_proj", "in", d, m, "b_in"),
                                         ("down_proj", "out", m, d, "b_out")):
        rules.append(linear(f"{mlp}.{hf}.weight", d_in, d_out, ("blocks", "mlp", f"W_{ours}")))
        if cfg.mlp_bias:
            rules.append(rule(f"{mlp}.{hf}.bias", (d_out,), ("blocks", "mlp", bias)))
    return rules


def save_prefix(key: str) -> str:
    """The prefix saved checkpoints put before ``key`` (transformers' own layout)."""
    return "" if key == "lm_head.weight" else "model."
