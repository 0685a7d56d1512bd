"""Shared fixtures: tiny random checkpoints written to temp dirs, and the HF PyTorch reference."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("PLATEAU_JAX_NO_PROGRESS", "1")

import numpy as np
import pytest

from plateau_jax import testing


CONTEXT = "The house was"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny byte-level BPE (vocab 400, GPT-2's file format), trained once per session."""
    return testing.make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def _checkpoint(tmp_path_factory, name, **kw):
    """A tiny_config checkpoint with its own tokenizer files in GPT-2's format (vocab.json,
    merges.txt), as a GPT-2 checkpoint has them."""
    d = str(tmp_path_factory.mktemp(name))
    testing.make_checkpoint(d, testing.tiny_config(), **kw)
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random GPT-2 checkpoint (3 layers, d 32, d_mlp 48, vocab 400; GPT-2's init) in the
    HF layout (config, safetensors, tokenizer)."""
    return _checkpoint(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import plateau_jax
    return plateau_jax.load_gpt2(tiny_dir)


@pytest.fixture(scope="session")
def plateau_dir(tmp_path_factory):
    """The same tiny shape with weight matrices x3 (sharper, more plateau-like nonlinearities)
    and random norm weights and biases (every parameter matters): the plateau, Jacobian and
    script tests' checkpoint."""
    return _checkpoint(tmp_path_factory, "plateau", seed=3, scale=3.0, randomize_norms=True)


@pytest.fixture(scope="session")
def plateau_model(plateau_dir):
    import plateau_jax
    return plateau_jax.load_gpt2(plateau_dir)


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


def right_padded_contexts(vocab, lengths):
    """Random contexts of the given lengths (seeded by their length) and their right-padded
    batch ``[B, max(lengths)]`` (padding id 0)."""
    ctx = [random_ids(vocab, (n,), seed=n) for n in lengths]
    padded = np.zeros((len(ctx), max(lengths)), np.int32)
    for i, c in enumerate(ctx):
        padded[i, :len(c)] = c
    return ctx, padded


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
