"""The shipped model ``tiny-plateau``: resolves offline, is the default, and has learned."""

import json
import os

import numpy as np
import pytest

import plateau_jax
from plateau_jax import testing
from plateau_jax.training import data
from plateau_jax.model import loading
from plateau_jax.model import shipped

NAME = "tiny-plateau"


@pytest.fixture(scope="module")
def model():
    return plateau_jax.load_gpt2(NAME)


@pytest.fixture(scope="module")
def summary():
    with open(os.path.join(shipped.shipped_models()[NAME], "training_summary.json")) as f:
        return json.load(f)




def test_is_registered_and_the_default():
    assert loading.DEFAULT_MODEL == NAME
    directory = loading.resolve_checkpoint(NAME)
    # where the package ships it (setup.cfg's package_data), not where shipped.py looks
    assert os.path.samefile(directory, os.path.join(os.path.dirname(plateau_jax.__file__),
                                                    "assets", NAME))
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
              "tokenizer_config.json", "heldout_sample.txt", "LICENSE-WordNet.txt"):
        assert os.path.isfile(os.path.join(directory, f)), f
    # the scripts' default: what --model is when no flag is given (not the constant it is set from)
    from absl import flags
    from experiments import plateaus  # noqa: F401 (defines the flags)
    FLAGS = flags.FLAGS
    FLAGS.unparse_flags()
    FLAGS(["plateaus", "--output_dir=x"])
    try:
        assert FLAGS.model == NAME and not FLAGS["model"].present
    finally:
        FLAGS.unparse_flags()


def test_loads_offline_without_the_hub(monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*a, **k):
        raise AssertionError("the shipped model must not touch the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    m = plateau_jax.load_gpt2(NAME)
    assert (m.config.n_layer, m.config.n_embd, m.config.vocab_size) == (6, 192, 4096)
    assert m.tokenizer is not None and len(m.tokenizer) == 4096


def test_small_and_16_bit():
    directory = shipped.shipped_models()[NAME]
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    assert size < 15e6
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {np.dtype("float16")}


def test_study_prompts_are_single_tokens(model):
    from plateau_jax.plateaus import prompts
    pairs = prompts.encode_pairs(model.tokenizer, "The house was", [(" big", " in"), (" big", " large")],
                                 model.config.n_positions)
    assert [model.tokenizer.decode([p.token_b]) for p in pairs] == [" in", " large"]


def test_heldout_loss_beats_random_init_and_unigram(model, summary):
    docs = shipped.heldout_sample(NAME)
    assert 20_000 < sum(map(len, docs)) <= 30_000
    stream = data.encode_stream(model.tokenizer, docs)
    windows = data.eval_windows(stream, model.config.n_positions, max_windows=64)
    assert windows.shape == (64, model.config.n_positions + 1)
    from experiments.train import make_eval
    evaluate = make_eval(model.config, chunk=32)  # one compiled shape for both models
    trained = evaluate(model.params, windows)
    rand = evaluate(testing.make_checkpoint(None, model.config, seed=0).params, windows)
    assert rand == pytest.approx(np.log(model.config.vocab_size), abs=0.3)
    # Measured on these 64 windows at release (README): trained 4.977, random init 8.352
    # nats/token; on the full held-out split: trained 4.99, unigram 6.72, random init 8.35.
    assert trained == pytest.approx(4.977, abs=0.01)
    assert trained < rand - 3.0
    assert trained < summary["unigram_loss"] - 1.5
    assert trained == pytest.approx(summary["final_loss"], abs=0.1)


def test_predicts_sensible_continuations(model):
    ids = model.to_tokens("The house was")
    logits = np.asarray(plateau_jax.forward(model, ids[None])[0][0, -1])
    top = [model.tokenizer.decode([int(t)]) for t in np.argsort(-logits)[:20]]
    assert any(w in top for w in (" built", " in", " a", " the", " full", " not", " very")), top
