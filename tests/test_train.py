"""experiments.train and plateau_jax.training.data: a few-step run on a tiny config, the
optimiser, the corpus reader and the tokenizer (no corpus needed: texts are passed in)."""

import json
import os

import numpy as np
import pytest

import plateau_jax
from experiments import train as train_lib
from plateau_jax.training import data
from plateau_jax.testing import TINY_CORPUS

WORDNET_LINE = ('03544360 06 n 02 house 0 home 1 001 @ 03259505 n 0000 | a dwelling that serves '
                'as living quarters for one or more families; "he has a house on Cape Cod"; '
                '"she felt she had to get out of the house"  \n')


def _tiny_texts():
    sentences = [s.strip() + " ." for s in TINY_CORPUS[0].split(" . ") if s.strip()][:11]
    train = [" ".join(sentences[i:] + sentences[:i]) for i in range(11)] * 6
    held = [" ".join(sentences[::-1])] * 3
    return train, held


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    config = train_lib.TrainConfig(
        out, vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_ctx=32, batch_size=8, steps=12,
        lr=1e-2, warmup_steps=3, save_steps=(0, 6), eval_every=6, eval_windows=4, log_every=3,
        save_dtype="float16")
    summary, model = train_lib.train(config, texts=_tiny_texts(), return_model=True)
    return out, summary, model


def test_short_run_writes_checkpoints_the_loader_reads_back_identically(tiny_run):
    out, summary, model = tiny_run
    for name in ("checkpoints/step_000000", "checkpoints/step_000006", "checkpoints/step_000012",
                 "final"):
        for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
            assert os.path.exists(os.path.join(out, name, f)), (name, f)
    ids = np.asarray([model.to_tokens("The house was big . The cat sat on the mat .")])
    want = np.asarray(plateau_jax.forward(model, ids)[0])
    for name in ("checkpoints/step_000012",):
        loaded = plateau_jax.load_gpt2(os.path.join(out, name))
        assert loaded.config == model.config
        np.testing.assert_array_equal(np.asarray(plateau_jax.forward(loaded, ids)[0]), want)
        # The tokenizer round-trips through the checkpoint (GPT-2 file format, AutoTokenizer).
        assert loaded.tokenizer.decode(loaded.to_tokens("The house was big")) == "The house was big"
    init = plateau_jax.load_gpt2(os.path.join(out, "checkpoints/step_000000"))
    assert not np.allclose(np.asarray(plateau_jax.forward(init, ids)[0]), want)


def test_short_run_learns_and_logs_heldout_loss(tiny_run):
    out, summary, _ = tiny_run
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 8 * 32
    # Random init ~ log(vocab); 12 steps on this repetitive text must cut the held-out loss a lot.
    assert summary["init_loss"] == pytest.approx(np.log(summary["model_config"]["vocab_size"]), abs=0.3)
    assert summary["final_loss"] < summary["init_loss"] - 1.0
    assert summary["final_loss_as_stored"] == pytest.approx(summary["final_loss"], abs=1e-2)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "heldout_loss_quick" in m] == [6]
    assert [m["step"] for m in metrics if "heldout_loss" in m] == [0, 12]
    assert json.load(open(os.path.join(out, "config.json")))["config"]["n_params"] == summary["n_params"]


def test_float16_final_checkpoint_matches_float32(tiny_run):
    out, _, model = tiny_run
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(out, "final", "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {np.dtype("float16")}
    loaded = plateau_jax.load_gpt2(os.path.join(out, "final"))
    ids = np.asarray([model.to_tokens("The house was in the city .")])
    np.testing.assert_allclose(np.asarray(plateau_jax.forward(loaded, ids)[0]),
                               np.asarray(plateau_jax.forward(model, ids)[0]), atol=0.05)


def test_optimizer_warmup_cosine_schedule():
    _, schedule = train_lib.make_optimizer(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1,
                                           weight_decay=0.0, clip_norm=1.0)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 0.9e-3, rel=1e-4)
    assert float(schedule(110)) == pytest.approx(1e-4)


def _clipped_adam_by_hand(grads, lr, clip_norm, b1=0.9, b2=0.99, eps=1e-8, clip=True):
    """The updates of global-norm clipping then Adam (no weight decay), step by step in numpy."""
    m = v = 0.0
    out = []
    for t, (g, rate) in enumerate(zip(grads, lr), start=1):
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        g = np.concatenate([g["w"].ravel(), g["b"].ravel()])
        if clip and norm > clip_norm:
            g = g * (clip_norm / norm)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        out.append(-rate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return out


def test_optimizer_clips_the_global_norm_before_adam():
    """Gradients whose global norm swings across the clip bound, past the warm-up: each applied
    update equals clipping + Adam computed by hand, and differs from Adam without the clipping
    (Adam alone is invariant to a constant gradient scale, not to these swings)."""
    import jax.numpy as jnp
    lr, clip_norm = 1e-2, 1.0
    opt, schedule = train_lib.make_optimizer(lr=lr, warmup=2, steps=12, min_lr_ratio=0.1,
                                             weight_decay=0.0, clip_norm=clip_norm)
    rng = np.random.default_rng(0)
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
    grads = [{k: (scale * rng.normal(size=np.shape(p))).astype(np.float32) for k, p in params.items()}
             for scale in (5e3, 0.05, 40.0, 0.2, 3e4, 0.1, 0.3)]
    rates = [float(schedule(t)) for t in range(len(grads))]
    assert rates[0] == 0.0 and min(rates[2:]) > 0.5 * lr  # past warm-up the updates are real
    want = _clipped_adam_by_hand(grads, rates, clip_norm)
    unclipped = _clipped_adam_by_hand(grads, rates, clip_norm, clip=False)
    state = opt.init(params)
    for t, g in enumerate(grads):
        upd, state = opt.update({k: jnp.asarray(x) for k, x in g.items()}, state, params)
        got = np.concatenate([np.asarray(upd["w"]).ravel(), np.asarray(upd["b"]).ravel()])
        np.testing.assert_allclose(got, want[t], rtol=2e-4, atol=1e-9, err_msg=f"step {t}")
        if t >= 2:
            assert np.abs(unclipped[t] - want[t]).max() > 0.1 * np.abs(want[t]).max(), t


def test_decay_mask_spares_biases_and_layernorm():
    mask = train_lib._decay_mask(plateau_jax.model.params.abstract_params(plateau_jax.testing.tiny_config()))
    assert mask["blocks"]["mlp"]["W_in"] and mask["embed"]["W_E"] and mask["blocks"]["attn"]["W_O"]
    assert not mask["blocks"]["mlp"]["b_in"] and not mask["ln_final"]["w"]
    assert not mask["blocks"]["ln1"]["b"]  # [L, d]: stacked, yet a bias


def test_parse_wordnet_gloss_line():
    key, text = data.parse_gloss_line(WORDNET_LINE)
    assert key == "n03544360"
    assert text == ("house, home: a dwelling that serves as living quarters for one or more "
                    "families. He has a house on Cape Cod. She felt she had to get out of the house.")
    assert data.parse_gloss_line("  1 This software and database is being provided\n") is None


def test_missing_corpus_has_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(data.CORPUS_ENV, raising=False)
    with pytest.raises(data.CorpusNotFoundError, match="apt-get install wordnet-base"):
        data.find_corpus(str(tmp_path))
    for f in data.WORDNET_FILES:
        (tmp_path / f).write_text(WORDNET_LINE)
    assert data.find_corpus(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv(data.CORPUS_ENV, str(tmp_path))
    assert [k for k, _ in data.load_documents()] == ["n03544360"] * 4


def test_split_is_deterministic_and_disjoint():
    docs = [(f"n{i:08d}", f"doc {i}") for i in range(2000)]
    tr, ho = data.split_documents(docs, heldout_per_mille=50)
    tr2, ho2 = data.split_documents(docs, heldout_per_mille=50)
    assert tr == tr2 and ho == ho2 and not set(tr) & set(ho)
    assert len(tr) + len(ho) == 2000 and 50 < len(ho) < 150


def test_tokenizer_is_gpt2_format_and_round_trips(tmp_path):
    train, _ = _tiny_texts()
    tok = data.train_tokenizer(train, str(tmp_path), vocab_size=300)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    assert len(tok) == 300
    text = "The house was big and old ."
    assert tok.decode(tok(text)["input_ids"]) == text
    stream = data.encode_stream(tok, ["a b", "c"])
    eot = tok.convert_tokens_to_ids(data.EOT)
    assert stream[0] == eot and list(stream).count(eot) == 2


def test_unigram_loss_and_windows():
    stream = np.array([0, 0, 1, 1], np.int32)  # counts +1: [3, 3, 1] / 7
    assert data.unigram_loss(stream, np.array([0, 2]), 3) == pytest.approx(
        -0.5 * (np.log(3 / 7) + np.log(1 / 7)))
    w = data.eval_windows(np.arange(10, dtype=np.int32), 3)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    b = data.random_windows(np.arange(100, dtype=np.int32), 5, 8, np.random.default_rng(0))
    assert b.shape == (5, 9) and (np.diff(b, axis=1) == 1).all()
