r"""Trains a GPT-2-architecture model from scratch with the project's own Flax model.

    python -m experiments.train --output_dir=runs/tiny-plateau

Corpus: WordNet 3.0 glosses (``apt-get install wordnet-base``; see :mod:`plateau_jax.data`).
A byte-level BPE is trained on the training split (or read from --tokenizer_dir), the model is
trained with AdamW (linear warm-up, cosine decay, global-norm clipping), and checkpoints in the
loader's layout (config.json + model.safetensors + tokenizer files) are written to
``output_dir/checkpoints/step_{N:06d}`` at --save_steps (0 = initialisation) and to
``output_dir/final``. Held-out loss is logged to ``output_dir/metrics.jsonl`` every
--eval_every steps; ``output_dir/summary.json`` records the final held-out loss, the unigram
baseline and the random-initialisation loss.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

def define_flags():
    """Defines this script's flags (called by ``__main__`` only, so that importing the
    module from tests or other scripts defines no flags)."""
    flags.DEFINE_string("output_dir", None, "Where checkpoints, metrics and the summary go.")
    flags.DEFINE_string("corpus_dir", None,
                        "Directory with WordNet's data.{noun,verb,adj,adv} (default: searched).")
    flags.DEFINE_string("tokenizer_dir", None,
                        "Reuse this tokenizer (vocab.json + merges.txt) instead of training one.")
    flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size (when training a tokenizer).")
    flags.DEFINE_integer("heldout_per_mille", 20, "Documents held out for evaluation, per mille.")
    flags.DEFINE_integer("n_layer", 6, "Transformer blocks.")
    flags.DEFINE_integer("n_embd", 192, "Residual width d_model.")
    flags.DEFINE_integer("n_head", 6, "Attention heads.")
    flags.DEFINE_integer("n_inner", None, "MLP width (default 4 * n_embd).")
    flags.DEFINE_integer("n_ctx", 128, "Context length (n_positions).")
    flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
    flags.DEFINE_integer("steps", 800, "Optimiser steps.")
    flags.DEFINE_float("lr", 2e-3, "Peak learning rate.")
    flags.DEFINE_float("min_lr_ratio", 0.1, "Final learning rate as a fraction of the peak.")
    flags.DEFINE_integer("warmup_steps", 50, "Linear warm-up steps.")
    flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
    flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clipping.")
    flags.DEFINE_float("beta2", 0.99, "Adam beta2.")
    flags.DEFINE_integer("seed", 0, "Init and data-order seed.")
    flags.DEFINE_list("save_steps", ["0", "25", "50", "100", "200", "400", "800"],
                      "Steps at which to save a checkpoint (0 = init).")
    flags.DEFINE_integer("eval_every", 100, "Evaluate held-out loss every this many steps.")
    flags.DEFINE_integer("eval_windows", 64, "Held-out windows of n_ctx tokens per evaluation "
                         "(the final evaluation uses all of them).")
    flags.DEFINE_integer("log_every", 25, "Log training loss every this many steps.")
    flags.DEFINE_enum("save_dtype", "float32", ["float32", "float16"],
                      "Storage dtype of the saved weights.")
    flags.DEFINE_float("max_minutes", None, "Stop early (and save) after this many minutes.")
    flags.DEFINE_string("package_to", None,
                        "After training, copy the final checkpoint with a held-out text sample, the "
                        "corpus licence and the training summary into this directory (e.g. "
                        "plateau_jax/assets/tiny-plateau, the shipped model).")
    flags.DEFINE_bool("package_only", False, "Skip training: only package an existing --output_dir.")
    common.define_runtime_flags()


def _decay_mask(params):
    """Weight decay on weight matrices (``W_*``) only, not on biases or norm gains."""
    import jax
    return jax.tree_util.tree_map_with_path(lambda path, a: path[-1].key.startswith("W_"), params)


def make_optimizer(lr: float, warmup: int, steps: int, min_lr_ratio: float, weight_decay: float,
                   clip_norm: float, beta2: float = 0.99):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``, after global-norm
    clipping; weight decay on matrices only (not biases or LayerNorm gains)."""
    import optax
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=max(1, warmup),
        decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=0.9, b2=beta2, weight_decay=weight_decay, mask=_decay_mask),
    ), schedule


def loss_fn(params, config, batch, precision="highest"):
    """Mean next-token cross-entropy (nats) of ``batch`` [B, T+1] (the library's core forward)."""
    from plateau_jax.training.loss import next_token_loss
    return next_token_loss(params, config, batch, precision)


def make_train_step(config, optimizer, precision="highest"):
    import jax
    import optax

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, config, batch, precision)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        gnorm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt_state, loss, gnorm

    return step


def make_eval(config, chunk: int = 16, precision="highest"):
    import jax
    import numpy as np

    f = jax.jit(lambda p, b: loss_fn(p, config, b, precision))

    def evaluate(params, windows) -> float:
        losses = [float(f(params, windows[i:i + chunk])) * len(windows[i:i + chunk])
                  for i in range(0, len(windows), chunk)]
        return float(np.sum(losses) / len(windows))

    return evaluate


def train(output_dir: str, *, corpus_dir=None, tokenizer_dir=None, vocab_size=4096,
          heldout_per_mille=20, n_layer=6, n_embd=192, n_head=6, n_inner=None, n_ctx=128,
          batch_size=16, steps=800, lr=2e-3, min_lr_ratio=0.1, warmup_steps=50,
          weight_decay=0.1, clip_norm=1.0, beta2=0.99, seed=0, save_steps=(0,), eval_every=100,
          eval_windows=64, log_every=25, save_dtype="float32", max_minutes=None,
          matmul_precision="highest",
          texts=None, flags_record=None, return_model=False):
    """The training run behind ``python -m experiments.train`` (see module doc).

    ``texts``: optional ``(train_texts, heldout_texts)`` to use instead of the corpus (tests).
    Returns the summary dict (also written to ``output_dir/summary.json``), and the trained
    float32 model too when ``return_model``.
    """
    import jax
    import numpy as np

    import plateau_jax
    from plateau_jax.training import data
    from plateau_jax import files

    t_start = time.time()
    files.prepare_output_dir(output_dir)
    if texts is None:
        docs = data.load_documents(corpus_dir)
        train_texts, held_texts = data.split_documents(docs, heldout_per_mille, seed=0)
        corpus = {"name": "WordNet 3.0 glosses", "dir": data.find_corpus(corpus_dir),
                  "licence": data.CORPUS_LICENCE, "documents": len(docs)}
    else:
        train_texts, held_texts = texts
        corpus = {"name": "given texts", "documents": len(train_texts) + len(held_texts)}
    corpus.update(train_documents=len(train_texts), heldout_documents=len(held_texts),
                  train_chars=sum(map(len, train_texts)), heldout_chars=sum(map(len, held_texts)))
    if not tokenizer_dir:
        data.train_tokenizer(train_texts, os.path.join(output_dir, "tokenizer"),
                             vocab_size=vocab_size)
        tokenizer_dir = os.path.join(output_dir, "tokenizer")
    tokenizer = data.load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    train_stream = data.encode_stream(tokenizer, train_texts)
    held_stream = data.encode_stream(tokenizer, held_texts)
    corpus.update(train_tokens=int(len(train_stream)), heldout_tokens=int(len(held_stream)))
    logging.info("Corpus: %s", corpus)

    config = plateau_jax.ModelConfig.gpt2(vocab_size=vocab, n_positions=n_ctx, d_model=n_embd,
                                          n_layer=n_layer, n_head=n_head,
                                          d_mlp=n_inner or 4 * n_embd)
    model = plateau_jax.init_model(config, seed=seed, tokenizer=tokenizer)
    n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(model.params)))
    optimizer, schedule = make_optimizer(lr, warmup_steps, steps, min_lr_ratio, weight_decay,
                                         clip_norm, beta2)
    opt_state = optimizer.init(model.params)
    train_step = make_train_step(config, optimizer, matmul_precision)
    evaluate = make_eval(config, precision=matmul_precision)
    all_eval = data.eval_windows(held_stream, n_ctx)
    quick_eval = all_eval[:eval_windows]
    unigram = data.unigram_loss(train_stream, all_eval[:, 1:], vocab)

    record = dict(flags_record or {})
    record.update(model_config=config.__dict__, n_params=n_params, corpus=corpus)
    files.write_config(output_dir, record)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    metrics = open(metrics_path, "w")

    def log_metric(**kw):
        metrics.write(json.dumps(kw) + "\n")
        metrics.flush()

    def save(params, name, dtype="float32"):
        m = model.replace(params=params)
        if dtype != "float32":
            m = m.astype(dtype)
        path = plateau_jax.save_gpt2(m, os.path.join(output_dir, name))
        for f in ("vocab.json", "merges.txt"):  # GPT-2's own tokenizer file format, too
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(path, f))
        logging.info("Saved %s", path)
        return path

    save_steps = sorted({int(s) for s in save_steps})
    params = model.params
    init_loss = evaluate(params, all_eval)
    logging.info("params=%d unigram=%.4f init held-out=%.4f", n_params, unigram, init_loss)
    log_metric(step=0, heldout_loss=init_loss, unigram_loss=unigram, time_s=time.time() - t_start)
    if 0 in save_steps:
        save(params, "checkpoints/step_000000")

    batches = data.iter_batches(train_stream, batch_size, n_ctx, seed)
    t_train = time.time()
    tokens = 0
    step = 0
    stopped_early = False
    for step in range(1, steps + 1):
        batch = next(batches)
        params, opt_state, loss, gnorm = train_step(params, opt_state, batch)
        tokens += batch_size * n_ctx
        if step % log_every == 0 or step == 1:
            loss = float(loss)
            el = time.time() - t_train
            logging.info("step %d loss %.4f gnorm %.3f lr %.2e tok/s %.0f", step, loss,
                         float(gnorm), float(schedule(step)), tokens / el)
            log_metric(step=step, train_loss=loss, grad_norm=float(gnorm),
                       lr=float(schedule(step)), tokens=tokens, time_s=time.time() - t_start)
        if step in save_steps:
            save(params, f"checkpoints/step_{step:06d}")
        if step % eval_every == 0 and step != steps:
            hl = evaluate(params, quick_eval)
            logging.info("step %d held-out loss %.4f (%d windows)", step, hl, len(quick_eval))
            log_metric(step=step, heldout_loss_quick=hl, time_s=time.time() - t_start)
        if max_minutes is not None and (time.time() - t_start) / 60 > max_minutes:
            logging.warning("Stopping at step %d: --max_minutes=%s reached.", step, max_minutes)
            stopped_early = True
            break
    train_s = time.time() - t_train
    final_loss = evaluate(params, all_eval)
    log_metric(step=step, heldout_loss=final_loss, time_s=time.time() - t_start)
    if step not in save_steps:
        save(params, f"checkpoints/step_{step:06d}")
    final_dir = save(params, "final", save_dtype)
    stored = plateau_jax.load_gpt2(final_dir)
    stored_loss = evaluate(stored.params, all_eval)
    summary = dict(steps=step, stopped_early=stopped_early, tokens_seen=tokens,
                   train_seconds=train_s, tokens_per_second=tokens / max(train_s, 1e-9),
                   total_seconds=time.time() - t_start, n_params=n_params,
                   heldout_windows=int(len(all_eval)), heldout_tokens_scored=int(all_eval[:, 1:].size),
                   unigram_loss=unigram, init_loss=init_loss, final_loss=final_loss,
                   final_loss_as_stored=stored_loss, save_dtype=save_dtype,
                   weights_bytes=os.path.getsize(os.path.join(final_dir, "model.safetensors")),
                   corpus=corpus, model_config=config.__dict__)
    files.atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    metrics.close()
    logging.info("Done: %s", summary)
    return (summary, model.replace(params=params)) if return_model else summary


SHIPPED_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "tokenizer.json")


def package(run_dir: str, dest: str, corpus_dir=None, heldout_per_mille: int = 20,
            sample_chars: int = 30000) -> str:
    """Copies ``run_dir/final`` into ``dest`` for shipping, with ``heldout_sample.txt`` (held-out
    documents the model never saw, one per line), ``LICENSE-WordNet.txt`` and
    ``training_summary.json`` (summary + metrics). Returns ``dest``."""
    from plateau_jax.training import data
    from plateau_jax import files

    src = os.path.join(run_dir, "final")
    os.makedirs(dest, exist_ok=True)
    for f in SHIPPED_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dest, f))
    docs = data.load_documents(corpus_dir)
    _, held = data.split_documents(docs, heldout_per_mille, seed=0)
    sample = data.heldout_sample(held, sample_chars)
    files.atomic_write_bytes(os.path.join(dest, "heldout_sample.txt"),
                          ("\n".join(sample) + "\n").encode())
    files.atomic_write_bytes(os.path.join(dest, "LICENSE-WordNet.txt"), data.WORDNET_LICENSE.encode())
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        summary["metrics"] = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_dir, "config.json")) as f:
        summary["run_config"] = json.load(f)
    files.atomic_write_json(os.path.join(dest, "training_summary.json"), summary)
    logging.info("Packaged %s into %s", src, dest)
    return dest


def main(argv):
    del argv
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required.")
    names = [n for n in ("output_dir", "corpus_dir", "tokenizer_dir", "vocab_size",
                         "heldout_per_mille", "n_layer", "n_embd", "n_head", "n_inner", "n_ctx",
                         "batch_size", "steps", "lr", "min_lr_ratio", "warmup_steps",
                         "weight_decay", "clip_norm", "beta2", "seed", "eval_every",
                         "eval_windows", "log_every", "save_dtype", "max_minutes",
                         "matmul_precision")]
    kw = {n: getattr(FLAGS, n) for n in names}
    common.apply_runtime_flags()
    kw["save_steps"] = [int(s) for s in FLAGS.save_steps]
    from plateau_jax.training.data import CorpusNotFoundError
    try:
        if not FLAGS.package_only:
            train(flags_record=dict(kw), **kw)
        if FLAGS.package_to:
            package(FLAGS.output_dir, FLAGS.package_to, FLAGS.corpus_dir, FLAGS.heldout_per_mille)
    except CorpusNotFoundError as e:
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    logging.basicConfig(level=logging.INFO)
    app.run(main)
