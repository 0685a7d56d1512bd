"""``config.json`` reading shared by the rotary families (GPT-NeoX, Llama-style): activation
names, rotary settings in both the legacy and the transformers >= 5 layout, the LayerNorm mode,
and the one error that lists every unsupported feature.

transformers >= 5 writes rotary settings as one ``rope_parameters`` dict (``rope_type``,
``rope_theta``, ``partial_rotary_factor``, scaling keys); hub checkpoints written earlier keep
them at the top level (``rope_theta``, or GPT-NeoX's ``rotary_emb_base``/``rotary_pct``) with an
optional ``rope_scaling`` dict. Both are read with transformers' precedence: the dict first,
then the top-level keys, then the defaults.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

from plateau_jax.model.config import UnsupportedConfigError

# HF ``hidden_act`` names -> ours. The tanh approximations (gelu_new, gelu_pytorch_tanh,
# gelu_fast) are one function.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
               "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
# Rotary frequency scalings implemented (plateau_jax.model.layers._inv_freq) and their keys.
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}
LN_MODES = ("auto", "normal", "identity")
# Flags no decoder-only family here supports.
_NEVER = ("is_encoder_decoder", "add_cross_attention")


def need(raw: Mapping, key: str) -> int:
    """A required positive integer of ``config.json``."""
    if key not in raw:
        raise ValueError(f"config.json lacks {key!r}.")
    return int(raw[key])


def sizes(raw: Mapping, n_positions: int) -> dict:
    """The :class:`ModelConfig` sizes every rotary family spells the same way in ``config.json``."""
    return dict(vocab_size=need(raw, "vocab_size"), n_positions=n_positions,
                d_model=need(raw, "hidden_size"), n_layer=need(raw, "num_hidden_layers"),
                n_head=need(raw, "num_attention_heads"))


def activation(raw: Mapping, problems: List[str], default: str) -> str:
    name = raw.get("hidden_act", default)
    if name not in ACTIVATIONS:
        problems.append(f"hidden_act={name!r} (supported: {sorted(ACTIVATIONS)})")
        return "silu"
    return ACTIVATIONS[name]


def rope(raw: Mapping, problems: List[str], *, theta_key: str, partial_key: str,
         default_partial: Optional[float], n_positions: int
         ) -> Tuple[float, Optional[float], Tuple[Tuple[str, object], ...]]:
    """``(rope_theta, partial_rotary_factor or None, rope_scaling)`` of a config, read as
    transformers reads it; unsupported scalings are added to ``problems``."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        problems.append(f"rope_scaling={params!r} (expected a dict)")
        params = {}
    theta = float(params.get("rope_theta", raw.get(theta_key, 10000.0)))
    partial = params.get("partial_rotary_factor", raw.get(partial_key, default_partial))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        problems.append(f"rope scaling type {kind!r} (supported: {sorted(ROPE_TYPES)})")
        return theta, partial, ()
    values = dict(params)
    if kind == "llama3":
        values.setdefault("original_max_position_embeddings",
                          raw.get("original_max_position_embeddings", n_positions))
    missing = [k for k in ROPE_TYPES[kind] if values.get(k) is None]
    if missing:
        problems.append(f"{kind} rope scaling without {missing}")
        return theta, partial, ()
    if kind == "default":
        return theta, partial, ()
    scaling = {"rope_type": kind, **{k: float(values[k]) for k in ROPE_TYPES[kind]}}
    return theta, None if partial is None else float(partial), tuple(sorted(scaling.items()))


def hf_rope_scaling(scaling) -> Optional[dict]:
    """Our ``rope_scaling`` tuple -> the ``rope_scaling`` dict of a legacy ``config.json``."""
    if not scaling:
        return None
    out = dict(scaling)
    if "original_max_position_embeddings" in out:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def common_problems(raw: Mapping, problems: List[str]) -> None:
    for flag in _NEVER:
        if raw.get(flag, False):
            problems.append(f"{flag}=True")


def resolve_ln_mode(raw: Mapping, ln_mode: str) -> str:
    """``"auto"``: the mode :func:`plateau_jax.save_model` recorded, else "normal"."""
    if ln_mode not in LN_MODES:
        raise ValueError(f"ln_mode={ln_mode!r}: expected one of {LN_MODES}.")
    return (raw.get("plateau_jax_ln_mode") or "normal") if ln_mode == "auto" else ln_mode


def refuse(what: str, problems: List[str]) -> None:
    """Raises one :class:`UnsupportedConfigError` listing every problem (if any)."""
    if problems:
        raise UnsupportedConfigError(
            f"This {what} config uses features plateau_jax does not implement: "
            + "; ".join(problems) + ". Use a checkpoint without them, or edit config.json if "
            "they are unintended.")


def check_representable(what: str, problems: List[str]) -> None:
    """Raises ``ValueError`` when a :class:`ModelConfig` cannot be written as ``what``'s config."""
    if problems:
        raise ValueError(f"this ModelConfig cannot be saved as a {what} config.json: "
                         + "; ".join(problems) + ".")
