"""Shared fixtures: tiny random checkpoints written to temp dirs, and the HF PyTorch reference."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("PLATEAU_JAX_NO_PROGRESS", "1")

import numpy as np
import pytest

from plateau_jax import testing


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random checkpoint (config, safetensors, tokenizer) in the HF layout."""
    d = str(tmp_path_factory.mktemp("tiny"))
    testing.make_checkpoint(d, testing.tiny_config(), seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import plateau_jax
    return plateau_jax.load_gpt2(tiny_dir)


def torch_gpt2(config_kwargs, seed=0, randomize=True):
    """A random transformers GPT2LMHeadModel (eager attention), with LayerNorm params and biases
    randomised too so that parity tests exercise every parameter."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config_kwargs = {"bos_token_id": 0, "eos_token_id": 0, **config_kwargs}
    cfg = GPT2Config(attn_implementation="eager", **config_kwargs)
    model = GPT2LMHeadModel(cfg).eval()
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    p.normal_(1.0, 0.2)
                else:
                    p.normal_(0.0, 0.2)
    return model


def to_numpy(t):
    return t.detach().cpu().numpy()


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def randomize_torch(model, seed=0):
    """Every parameter of a transformers model redrawn: biases N(0, 0.1), norm weights
    N(1, 0.2), everything else N(0, 0.2), so that parity tests exercise every parameter."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    return model


HF_CLASSES = {"gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
              "llama": ("LlamaConfig", "LlamaForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM")}


def torch_causal_lm(model_type, config_kwargs, seed=0):
    """A random transformers causal LM of ``model_type`` (eager attention, float32, eval)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[model_type])
    cfg = config_cls(attn_implementation="eager", **config_kwargs)
    return randomize_torch(model_cls(cfg).eval(), seed)
