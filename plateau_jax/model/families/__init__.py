"""Checkpoint families: how a HuggingFace ``config.json`` and its tensors map onto
:class:`~plateau_jax.model.config.ModelConfig` and the canonical param tree.

A family module provides ``MODEL_TYPES`` (the ``model_type`` values it reads), ``PREFIXES`` (key
prefixes its checkpoints may use), ``IGNORED`` (a regex of buffers to skip),
``ALIASES`` (other names of a tensor -> its name in the rules), ``TIED_KEY`` (the unembedding's
key, dropped when the config ties it to the embedding), ``config_from_hf(raw, ln_mode)``,
``config_to_hf(config)``, ``tensor_rules(config)`` (a list of
:class:`~plateau_jax.model.families.rules.TensorRule`) and ``save_prefix(key)``.

Families: ``gpt2`` (GPT-2), ``gpt_neox`` (GPT-NeoX, Pythia), ``llama`` (Llama, Qwen2, Mistral
without a binding sliding window, and every ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Mapping

from plateau_jax.model.config import UnsupportedConfigError
from plateau_jax.model.families import gpt2, gpt_neox, llama

_FAMILIES = {"gpt2": gpt2, "gpt_neox": gpt_neox, "llama": llama}


def get(family: str) -> ModuleType:
    """The family module named ``family`` ("gpt2", "gpt_neox", "llama")."""
    if family not in _FAMILIES:
        raise UnsupportedConfigError(f"family {family!r}: supported families are {sorted(_FAMILIES)}.")
    return _FAMILIES[family]


def for_hf_config(raw: Mapping) -> ModuleType:
    """The family module that reads a ``config.json`` with this ``model_type``."""
    model_type = raw.get("model_type", "gpt2")
    for module in _FAMILIES.values():
        if model_type in module.MODEL_TYPES:
            return module
    known = sorted(t for m in _FAMILIES.values() for t in m.MODEL_TYPES)
    raise UnsupportedConfigError(
        f"model_type={model_type!r} is not supported; plateau_jax reads {known}.")
