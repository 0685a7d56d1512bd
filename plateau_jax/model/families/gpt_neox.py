"""GPT-NeoX checkpoints (``model_type: gpt_neox``; Pythia): config translation and tensor layout.

Architecture: LayerNorm (weight and bias), rotary embeddings on the first
``rotary_dim = int(d_head * rotary_pct)`` dimensions of each head ("rotate half" layout), a
parallel residual by default (``use_parallel_residual``: attention and MLP both read
``resid_pre``), a GELU MLP with biases, attention biases unless ``attention_bias`` is false, and
an untied unembedding ``embed_out`` unless ``tie_word_embeddings``.

On disk (``torch.nn.Linear`` weights ``[out, in]``; body keys under ``gpt_neox.``)::

    embed_in.weight [V, d]    final_layer_norm.{weight,bias} [d]    embed_out.weight [V, d]
    layers.{i}.input_layernorm / post_attention_layernorm .{weight,bias} [d]
    layers.{i}.attention.query_key_value.weight [3 H k, d], .bias [3 H k]   (per head: q, k, v)
    layers.{i}.attention.dense.weight [d, H k], .bias [d]
    layers.{i}.mlp.dense_h_to_4h.weight [m, d], .bias [m]
    layers.{i}.mlp.dense_4h_to_h.weight [d, m], .bias [d]

The fused ``query_key_value`` is interleaved per head: its output, viewed as ``[H, 3 k]``, holds
head h's query, key and value side by side. transformers >= 5 calls ``embed_out`` ``lm_head``
when it saves; both names load. Buffers some checkpoints carry (``attention.bias``,
``attention.masked_bias``, ``rotary_emb.inv_freq``) are ignored. Dropout rates are read and
ignored (inference never drops).
"""

from __future__ import annotations

import re
from typing import List

import numpy as np

from plateau_jax.model.config import ModelConfig
from plateau_jax.model.families import hf_config
from plateau_jax.model.families.rules import TensorRule, heads_out, linear, rule

MODEL_TYPES = ("gpt_neox",)
PREFIXES = ("gpt_neox.", "")
IGNORED = re.compile(r"(^|\.)attention\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")
# Other names of a tensor -> the name in ``tensor_rules``.
ALIASES = {"lm_head.weight": "embed_out.weight"}
# The unembedding's key, dropped when the config ties it to the embedding.
TIED_KEY = "embed_out.weight"


def config_from_hf(raw, *, ln_mode: str = "auto") -> ModelConfig:
    """A :class:`ModelConfig` from a GPT-NeoX ``config.json`` dict (every unsupported feature
    refused in one error). ``ln_mode="auto"`` reads back what :func:`save_model` recorded."""
    problems: List[str] = []
    hf_config.common_problems(raw, problems)
    act = hf_config.activation(raw, problems, default="gelu")
    d_model, n_head = hf_config.need(raw, "hidden_size"), hf_config.need(raw, "num_attention_heads")
    n_positions = int(raw.get("max_position_embeddings", 2048))
    theta, pct, scaling = hf_config.rope(raw, problems, theta_key="rotary_emb_base",
                                         partial_key="rotary_pct", default_partial=0.25,
                                         n_positions=n_positions)
    d_head = d_model // n_head if d_model % n_head == 0 else 0
    rotary_dim = int(d_head * float(pct))
    if not (0 < rotary_dim <= d_head and rotary_dim % 2 == 0):
        problems.append(f"rotary_pct={pct} (int(d_head * rotary_pct) = {rotary_dim} must be even "
                        f"and in (0, d_head={d_head}])")
    hf_config.refuse("GPT-NeoX", problems)
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        **hf_config.sizes(raw, n_positions),
        d_mlp=int(raw.get("intermediate_size", 4 * d_model)),
        norm="layernorm",
        norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        ln_mode=hf_config.resolve_ln_mode(raw, ln_mode),
        act=act,
        positional="rotary",
        rotary_dim=rotary_dim,
        rotary_base=theta,
        rope_scaling=scaling,
        parallel_residual=bool(raw.get("use_parallel_residual", True)),
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=True,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A GPT-NeoX ``config.json`` dict (legacy key names, which every transformers version and
    our loader read)."""
    problems = []
    if cfg.family != "gpt_neox":
        problems.append(f"family {cfg.family!r}")
    for ok, what in ((cfg.norm == "layernorm", "RMSNorm"), (cfg.positional == "rotary", "learned positions"),
                     (not cfg.gated_mlp, "a gated MLP"), (cfg.n_kv_head == cfg.n_head, "grouped-query attention"),
                     (cfg.d_head * cfg.n_head == cfg.d_model, "d_head != d_model / n_head"),
                     (cfg.attn_bias == cfg.attn_out_bias, "Q/K/V and output biases that differ"),
                     (cfg.mlp_bias, "an MLP without biases"), (cfg.scale_attn, "unscaled attention")):
        if not ok:
            problems.append(what)
    pct = cfg.rotary_dim / cfg.d_head if cfg.d_head else 0.0
    if int(cfg.d_head * pct) != cfg.rotary_dim:
        problems.append(f"rotary_dim={cfg.rotary_dim} (not int(d_head * rotary_pct) for any float)")
    hf_config.check_representable("GPT-NeoX", problems)
    return {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_positions,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_mlp,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.norm_eps,
        "rotary_pct": pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_scaling": hf_config.hf_rope_scaling(cfg.rope_scaling),
        "use_parallel_residual": cfg.parallel_residual,
        "attention_bias": cfg.attn_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "plateau_jax_ln_mode": cfg.ln_mode,
    }


def _qkv(which: str, H: int, k: int, d: int) -> TensorRule:
    """The fused, per-head interleaved ``query_key_value`` weight ``[3 H k, d]`` or bias."""
    paths = [("blocks", "attn", f"{which}_{x}") for x in "QKV"]
    if which == "W":
        split = lambda a: {p: a.reshape(H, 3, k, d)[:, j].transpose(0, 2, 1)
                           for j, p in enumerate(paths)}
        join = lambda get: np.stack(
            [get(p).transpose(0, 2, 1) for p in paths], axis=1).reshape(3 * H * k, d)
        return TensorRule("layers.{i}.attention.query_key_value.weight", (3 * H * k, d), split, join)
    split = lambda a: {p: a.reshape(H, 3, k)[:, j] for j, p in enumerate(paths)}
    join = lambda get: np.stack([get(p) for p in paths], axis=1).reshape(3 * H * k)
    return TensorRule("layers.{i}.attention.query_key_value.bias", (3 * H * k,), split, join)


def tensor_rules(cfg: ModelConfig) -> List[TensorRule]:
    """Every tensor a GPT-NeoX checkpoint with this config holds (see the module docstring)."""
    d, m, H, k, V = cfg.d_model, cfg.d_mlp, cfg.n_head, cfg.d_head, cfg.vocab_size
    rules = [rule("embed_in.weight", (V, d), ("embed", "W_E")),
             rule("final_layer_norm.weight", (d,), ("ln_final", "w")),
             rule("final_layer_norm.bias", (d,), ("ln_final", "b"))]
    if not cfg.tie_embeddings:
        rules.append(linear("embed_out.weight", d, V, ("unembed", "W_U")))
    for hf, ln in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
        rules += [rule(f"layers.{{i}}.{hf}.weight", (d,), ("blocks", ln, "w")),
                  rule(f"layers.{{i}}.{hf}.bias", (d,), ("blocks", ln, "b"))]
    rules += [_qkv("W", H, k, d),
              heads_out("layers.{i}.attention.dense.weight", H, k, d, ("blocks", "attn", "W_O"))]
    if cfg.attn_bias:
        rules += [_qkv("b", H, k, d),
                  rule("layers.{i}.attention.dense.bias", (d,), ("blocks", "attn", "b_O"))]
    rules += [linear("layers.{i}.mlp.dense_h_to_4h.weight", d, m, ("blocks", "mlp", "W_in")),
              rule("layers.{i}.mlp.dense_h_to_4h.bias", (m,), ("blocks", "mlp", "b_in")),
              linear("layers.{i}.mlp.dense_4h_to_h.weight", m, d, ("blocks", "mlp", "W_out")),
              rule("layers.{i}.mlp.dense_4h_to_h.bias", (d,), ("blocks", "mlp", "b_out"))]
    return rules


def save_prefix(key: str) -> str:
    """The prefix saved checkpoints put before ``key`` (the hub's Pythia layout)."""
    return "" if key == "embed_out.weight" else "gpt_neox."
