"""Offline fixtures for tests, benchmarks and demos: a tiny byte-level BPE tokenizer in GPT-2's
file format and random-weight checkpoints (GPT-2, GPT-NeoX, Llama-style) in the HF layout. No
network is used."""

from __future__ import annotations

import os
from typing import Optional

from plateau_jax.model.config import ModelConfig
from plateau_jax.model.model import Model, init_model

# Enough text that the study's endings (" big", " in", " large", ...) become single tokens.
_WORDS = ("The house was big . The house was in the city . The house was large and old . "
          "A dog was small . The car was red and fast . It is in the box . The man was tall . "
          "She was happy . They were here and there . The sky is blue . The cat sat on the mat . ")
TINY_CORPUS = [_WORDS * 20]


def make_tokenizer(directory: str, vocab_size: int = 400):
    """Trains a byte-level BPE on :data:`TINY_CORPUS`, saves ``vocab.json``/``merges.txt`` (+
    tokenizer config) in ``directory`` and returns it loaded as a transformers tokenizer."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    os.makedirs(directory, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(directory)
    special = "<|endoftext|>"
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": special, "eos_token": special,
                   "unk_token": special, "add_prefix_space": False}, f)
    return AutoTokenizer.from_pretrained(directory)


def tiny_config(**overrides) -> ModelConfig:
    """A 3-layer, d_model 32 config sized for the tiny tokenizer (vocab 400)."""
    kw = dict(vocab_size=400, n_positions=64, d_model=32, n_layer=3, n_head=4, d_mlp=48)
    kw.update(overrides)
    return ModelConfig.gpt2(**kw)


def tiny_neox_config(**overrides) -> ModelConfig:
    """A 3-layer, d_model 32 GPT-NeoX (Pythia-style: parallel residual, rotary on half of each
    8-wide head) config sized for the tiny tokenizer."""
    kw = dict(vocab_size=400, n_positions=64, d_model=32, n_layer=3, n_head=4, d_mlp=48,
              rotary_dim=4)
    kw.update(overrides)
    return ModelConfig.gpt_neox(**kw)


def tiny_llama_config(**overrides) -> ModelConfig:
    """A 3-layer, d_model 32 Llama-style config (RMSNorm, rotary, 4 query / 2 key-value heads,
    SwiGLU) sized for the tiny tokenizer; ``attn_bias=True`` makes it Qwen2-style."""
    kw = dict(vocab_size=400, n_positions=64, d_model=32, n_layer=3, n_head=4, n_kv_head=2,
              d_mlp=48)
    kw.update(overrides)
    return ModelConfig.llama(**kw)


def make_checkpoint(directory: Optional[str] = None, config: Optional[ModelConfig] = None,
                    seed: int = 0, tokenizer=None, scale: float = 1.0,
                    randomize_norms: bool = False) -> Model:
    """A random-weight model of ``config`` (default :func:`tiny_config`; any family), written as a
    checkpoint in the HF layout (config.json, model.safetensors, tokenizer files) when
    ``directory`` is given. Returns the model as written.

    The weights are GPT-2's initialisation (:func:`plateau_jax.init_model` with ``seed``);
    ``scale`` multiplies every weight matrix (larger values give sharper, more plateau-like
    nonlinear responses in random models). ``randomize_norms`` draws every norm weight (LayerNorm
    or RMSNorm) from 1 + 0.1 N(0, 1) and every bias from 0.1 N(0, 1) instead of GPT-2's 1 and 0, so
    that what a test checks depends on them too. With a ``directory`` and no ``tokenizer``, the tiny
    byte-level BPE (:func:`make_tokenizer`) is trained there; without a ``directory`` nothing is
    written and the model has ``tokenizer`` (default none).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from plateau_jax.model.loading import save_model

    config = config or tiny_config()
    if tokenizer is None and directory is not None:
        tokenizer = make_tokenizer(directory, vocab_size=config.vocab_size)
    model = init_model(config, seed=seed, tokenizer=tokenizer)
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        if name.startswith("W_"):
            return a * scale if scale != 1.0 else a
        if not randomize_norms:
            return a
        base = 1.0 if name == "w" else 0.0  # norm weights are "w", biases "b", "b_Q", ...
        return jnp.asarray(base + 0.1 * rng.standard_normal(a.shape), a.dtype)

    model = model.replace(params=jax.tree_util.tree_map_with_path(draw, model.params))
    if directory is not None:
        save_model(model, directory)
    return model
