"""Models and tokenizers shipped inside the package, usable offline.

Every directory ``plateau_jax/assets/<name>/`` holding a ``config.json`` becomes
``plateau_jax.model.loading.LOCAL_MODELS[<name>]``; ``load_model("tiny-plateau")`` then reads it
with no network. ``tiny-plateau`` is the project's own small GPT-2 (trained by
``python -m experiments.train``; see the README) and the scripts' default model.

``gpt2_tokenizer()`` is GPT-2's own BPE tokenizer (the released ``encoder.json`` and
``vocab.bpe``, MIT licence, vendored in ``assets/gpt2-tokenizer``): with
``ModelConfig.preset("gpt2-large")`` and random weights it gives a study-shaped model offline.
"""

from __future__ import annotations

import os
from typing import Dict

from plateau_jax.model import loading

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# Files every shipped model directory carries besides the checkpoint itself.
HELDOUT_SAMPLE = "heldout_sample.txt"


def shipped_models() -> Dict[str, str]:
    """name -> directory of every model shipped in :data:`MODELS_DIR`."""
    if not os.path.isdir(MODELS_DIR):
        return {}
    return {name: os.path.join(MODELS_DIR, name) for name in sorted(os.listdir(MODELS_DIR))
            if os.path.isfile(os.path.join(MODELS_DIR, name, "config.json"))}


def register() -> Dict[str, str]:
    """Adds the shipped models to ``loading.LOCAL_MODELS`` (existing entries win)."""
    found = shipped_models()
    for name, path in found.items():
        loading.LOCAL_MODELS.setdefault(name, path)
    return found


GPT2_TOKENIZER_DIR = os.path.join(MODELS_DIR, "gpt2-tokenizer")


def gpt2_tokenizer():
    """GPT-2's tokenizer (vocabulary 50257; " big", " in", " large" are tokens 1263, 287, 1588)."""
    import warnings

    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR)


def heldout_sample(name: str = loading.DEFAULT_MODEL) -> list:
    """The held-out documents shipped with a model (one per line), for quick evaluation."""
    path = os.path.join(shipped_models()[name], HELDOUT_SAMPLE)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


register()
