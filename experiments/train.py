r"""Trains a GPT-2-architecture model from scratch with the project's own Flax model.

    python -m experiments.train --output_dir=runs/tiny-plateau

Corpus: WordNet 3.0 glosses (``apt-get install wordnet-base``; see
:mod:`plateau_jax.training.data`).
A byte-level BPE is trained on the training split (or read from --tokenizer_dir), the model is
trained with AdamW (linear warm-up, cosine decay, global-norm clipping), and checkpoints in the
loader's layout (config.json + model.safetensors + tokenizer files) are written to
``output_dir/checkpoints/step_{N:06d}`` at --save_steps (0 = initialisation) and to
``output_dir/final``. Held-out loss is logged to ``output_dir/metrics.jsonl`` every
--eval_every steps; ``output_dir/summary.json`` records the final held-out loss, the unigram
baseline and the random-initialisation loss.

A run is described by one :class:`TrainConfig` (its fields carry the defaults and help texts;
the flags are generated from them) and carried out by :func:`train` in steps: data
(:func:`prepare_data`), model and optimiser (:func:`build_model`, :func:`make_optimizer`), the
loop (:func:`train_loop`), evaluation and checkpoints (:class:`RunLog`), and the summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Optional, Tuple

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
SAVE_DTYPES = ("float32", "float16")


def _field(default, help_text: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help_text, **metadata})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on: the one place of the defaults. Each field is a
    flag of ``python -m experiments.train`` (:func:`define_flags`) and a key of the run's
    ``config.json``. Invalid values raise :class:`experiments.common.InputError` naming the flag."""

    output_dir: Optional[str] = _field(None, "Where checkpoints, metrics and the summary go.")
    corpus_dir: Optional[str] = _field(
        None, "Directory with WordNet's data.{noun,verb,adj,adv} (default: searched).")
    tokenizer_dir: Optional[str] = _field(
        None, "Reuse this tokenizer (vocab.json + merges.txt) instead of training one.")
    vocab_size: int = _field(4096, "BPE vocabulary size (when training a tokenizer).")
    heldout_per_mille: int = _field(20, "Documents held out for evaluation, per mille.")
    n_layer: int = _field(6, "Transformer blocks.")
    n_embd: int = _field(192, "Residual width d_model.")
    n_head: int = _field(6, "Attention heads.")
    n_inner: Optional[int] = _field(None, "MLP width (default 4 * n_embd).", type=int)
    n_ctx: int = _field(128, "Context length (n_positions).")
    batch_size: int = _field(16, "Sequences per step.")
    steps: int = _field(800, "Optimiser steps.")
    lr: float = _field(2e-3, "Peak learning rate.")
    min_lr_ratio: float = _field(0.1, "Final learning rate as a fraction of the peak.")
    warmup_steps: int = _field(50, "Linear warm-up steps.")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only).")
    clip_norm: float = _field(1.0, "Global gradient-norm clipping.")
    beta2: float = _field(0.99, "Adam beta2.")
    seed: int = _field(0, "Init and data-order seed.")
    save_steps: Tuple[int, ...] = _field((0, 25, 50, 100, 200, 400, 800),
                                         "Steps at which to save a checkpoint (0 = init).")
    eval_every: int = _field(100, "Evaluate held-out loss every this many steps.")
    eval_windows: int = _field(64, "Held-out windows of n_ctx tokens per evaluation (the final "
                               "evaluation uses all of them).")
    log_every: int = _field(25, "Log training loss every this many steps.")
    save_dtype: str = _field("float32", "Storage dtype of the saved weights.",
                             choices=SAVE_DTYPES)
    max_minutes: Optional[float] = _field(None, "Stop early (and save) after this many minutes.",
                                          type=float)
    matmul_precision: str = _field("highest", "Matrix-product precision (a runtime flag shared "
                                   "by every script).", runtime=True)

    def __post_init__(self):
        if not self.output_dir:
            raise common.InputError("--output_dir is required.")
        object.__setattr__(self, "save_steps", tuple(sorted({int(s) for s in self.save_steps})))
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_ctx", "batch_size", "steps",
                     "eval_every", "eval_windows", "log_every"):
            common.positive(name, getattr(self, name))
        common.positive("warmup_steps", self.warmup_steps, 0)
        if self.n_inner is not None:
            common.positive("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise common.InputError(f"--n_embd={self.n_embd} must be a multiple of "
                                    f"--n_head={self.n_head}.")
        if not 0 < self.heldout_per_mille < 1000:
            raise common.InputError(f"--heldout_per_mille={self.heldout_per_mille}: expected "
                                    "1..999.")
        for name in ("lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise common.InputError(f"--{name}={getattr(self, name)}: expected a number > 0.")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.beta2 < 1 or self.weight_decay < 0:
            raise common.InputError("--min_lr_ratio must be in [0, 1], --beta2 in [0, 1), "
                                    "--weight_decay >= 0.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise common.InputError(f"--max_minutes={self.max_minutes}: expected a number > 0.")
        if any(v < 0 for v in self.save_steps):
            raise common.InputError(f"--save_steps: steps must be >= 0; got "
                                    f"{list(self.save_steps)}.")
        if self.save_dtype not in SAVE_DTYPES:
            raise common.InputError(f"--save_dtype={self.save_dtype}: expected one of "
                                    f"{SAVE_DTYPES}.")

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def record(self) -> dict:
        """The configuration as written to ``config.json`` (and compared on a rerun)."""
        return dataclasses.asdict(self)


def define_flags():
    """Defines this script's flags, one per :class:`TrainConfig` field with its default and
    help (called by ``__main__`` only, so that importing the module from tests or other
    scripts defines no flags), plus the packaging flags."""
    common.define_overwrite_flag()
    common.define_runtime_flags()
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = f.metadata.get("type", type(f.default)), f.metadata["help"]
        if f.metadata.get("runtime"):  # defined by common.define_runtime_flags
            if FLAGS[f.name].default != f.default:
                raise AssertionError(f"--{f.name}'s default {FLAGS[f.name].default!r} differs "
                                     f"from TrainConfig's {f.default!r}.")
        elif "choices" in f.metadata:
            flags.DEFINE_enum(f.name, f.default, list(f.metadata["choices"]), help_text)
        elif isinstance(f.default, tuple):
            flags.DEFINE_list(f.name, [str(v) for v in f.default], help_text)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, help_text)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, help_text)
        else:
            flags.DEFINE_string(f.name, f.default, help_text)
    flags.DEFINE_string("package_to", None,
                        "After training, copy the final checkpoint with a held-out text sample, the "
                        "corpus licence and the training summary into this directory (e.g. "
                        "plateau_jax/assets/tiny-plateau, the shipped model).")
    flags.DEFINE_bool("package_only", False, "Skip training: only package an existing --output_dir.")


def config_from_flags() -> TrainConfig:
    """The :class:`TrainConfig` of the parsed flags (validated)."""
    try:
        save_steps = tuple(int(v) for v in FLAGS.save_steps)
    except ValueError:
        raise common.InputError(f"--save_steps={','.join(FLAGS.save_steps)}: expected step "
                                "numbers, e.g. 0,100,800.") from None
    values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, "save_steps": save_steps})


# ----------------------------------------------------------------------------- optimiser, steps

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


# ----------------------------------------------------------------------------- a run, in steps

@dataclasses.dataclass
class TrainData:
    """The tokenizer, the training stream and the held-out windows of a run."""

    tokenizer: object
    tokenizer_dir: str
    train_stream: object
    all_eval: object  # [windows, n_ctx + 1]: every held-out window
    quick_eval: object  # the first eval_windows of them
    unigram: float
    corpus: dict


def prepare_data(config: TrainConfig, texts=None) -> TrainData:
    """Reads and splits the corpus (or ``texts = (train, heldout)``), trains or reads the
    tokenizer, encodes both splits and the held-out windows, and the unigram baseline."""
    from plateau_jax.training import data

    if texts is None:
        docs = data.load_documents(config.corpus_dir)
        train_texts, held_texts = data.split_documents(docs, config.heldout_per_mille, seed=0)
        corpus = {"name": "WordNet 3.0 glosses", "dir": data.find_corpus(config.corpus_dir),
                  "licence": data.CORPUS_LICENCE, "documents": len(docs)}
    else:
        train_texts, held_texts = texts
        corpus = {"name": "given texts", "documents": len(train_texts) + len(held_texts)}
    corpus.update(train_documents=len(train_texts), heldout_documents=len(held_texts),
                  train_chars=sum(map(len, train_texts)), heldout_chars=sum(map(len, held_texts)))
    tokenizer_dir = config.tokenizer_dir
    if not tokenizer_dir:
        tokenizer_dir = os.path.join(config.output_dir, "tokenizer")
        data.train_tokenizer(train_texts, tokenizer_dir, vocab_size=config.vocab_size)
    tokenizer = data.load_tokenizer(tokenizer_dir)
    train_stream = data.encode_stream(tokenizer, train_texts)
    held_stream = data.encode_stream(tokenizer, held_texts)
    corpus.update(train_tokens=int(len(train_stream)), heldout_tokens=int(len(held_stream)))
    logging.info("Corpus: %s", corpus)
    all_eval = data.eval_windows(held_stream, config.n_ctx)
    return TrainData(tokenizer, tokenizer_dir, train_stream, all_eval,
                     all_eval[:config.eval_windows],
                     data.unigram_loss(train_stream, all_eval[:, 1:], len(tokenizer)), corpus)


def build_model(config: TrainConfig, tokenizer):
    """The randomly initialised model of ``config`` (``seed``) with ``tokenizer``."""
    import plateau_jax

    model_config = plateau_jax.ModelConfig.gpt2(
        vocab_size=len(tokenizer), n_positions=config.n_ctx, d_model=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, d_mlp=config.d_mlp)
    return plateau_jax.init_model(model_config, seed=config.seed, tokenizer=tokenizer)


class RunLog:
    """A run's metrics log (``metrics.jsonl``, one JSON line per record, flushed at once) and its
    checkpoints (in the loader's layout, with GPT-2's tokenizer files). A context manager: the
    log file is closed on exit."""

    def __init__(self, config: TrainConfig, model, tokenizer_dir: str):
        self.config, self.model, self.tokenizer_dir = config, model, tokenizer_dir
        self._file = open(os.path.join(config.output_dir, "metrics.jsonl"), "w")

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def metric(self, **kw) -> None:
        self._file.write(json.dumps(kw) + "\n")
        self._file.flush()

    def save(self, params, name: str, dtype: str = "float32") -> str:
        """Writes ``params`` as checkpoint ``output_dir/name`` (stored in ``dtype``)."""
        import plateau_jax

        m = self.model.replace(params=params)
        if dtype != "float32":
            m = m.astype(dtype)
        path = plateau_jax.save_model(m, os.path.join(self.config.output_dir, name))
        for f in ("vocab.json", "merges.txt"):  # GPT-2's own tokenizer file format, too
            if os.path.exists(os.path.join(self.tokenizer_dir, f)):
                shutil.copyfile(os.path.join(self.tokenizer_dir, f), os.path.join(path, f))
        logging.info("Saved %s", path)
        return path

    def checkpoint(self, params, step: int) -> str:
        return self.save(params, f"checkpoints/step_{step:06d}")


@dataclasses.dataclass
class LoopResult:
    params: object
    step: int  # the last step taken
    tokens: int  # tokens seen
    stopped_early: bool
    train_seconds: float


def train_loop(config: TrainConfig, params, opt_state, train_step, schedule, evaluate,
               data: TrainData, log: RunLog, t_start: float) -> LoopResult:
    """The optimiser steps: training loss logged every ``log_every`` steps, checkpoints at
    ``save_steps``, the quick held-out loss every ``eval_every`` steps, and an early stop after
    ``max_minutes``."""
    from plateau_jax.training import data as data_lib

    batches = data_lib.iter_batches(data.train_stream, config.batch_size, config.n_ctx,
                                    config.seed)
    t_train = time.time()
    tokens = 0
    step = 0
    stopped_early = False
    for step in range(1, config.steps + 1):
        batch = next(batches)
        params, opt_state, loss, gnorm = train_step(params, opt_state, batch)
        tokens += config.batch_size * config.n_ctx
        if step % config.log_every == 0 or step == 1:
            loss = float(loss)
            el = time.time() - t_train
            logging.info("step %d loss %.4f gnorm %.3f lr %.2e tok/s %.0f", step, loss,
                         float(gnorm), float(schedule(step)), tokens / el)
            log.metric(step=step, train_loss=loss, grad_norm=float(gnorm),
                       lr=float(schedule(step)), tokens=tokens, time_s=time.time() - t_start)
        if step in config.save_steps:
            log.checkpoint(params, step)
        if step % config.eval_every == 0 and step != config.steps:
            hl = evaluate(params, data.quick_eval)
            logging.info("step %d held-out loss %.4f (%d windows)", step, hl, len(data.quick_eval))
            log.metric(step=step, heldout_loss_quick=hl, time_s=time.time() - t_start)
        if config.max_minutes is not None and (time.time() - t_start) / 60 > config.max_minutes:
            logging.warning("Stopping at step %d: --max_minutes=%s reached.", step,
                            config.max_minutes)
            stopped_early = True
            break
    return LoopResult(params, step, tokens, stopped_early, time.time() - t_train)


def train(config: TrainConfig, *, texts=None, return_model: bool = False):
    """The training run behind ``python -m experiments.train`` (see module doc).

    ``texts``: optional ``(train_texts, heldout_texts)`` to use instead of the corpus (tests).
    Returns the summary dict (also written to ``output_dir/summary.json``), and the trained
    float32 model too when ``return_model``.
    """
    import jax

    import plateau_jax
    from plateau_jax.training import data as data_lib
    from plateau_jax import files

    t_start = time.time()
    if texts is None:
        # a missing corpus stops the run before anything is written
        data_lib.find_corpus(config.corpus_dir)
    files.prepare_output_dir(config.output_dir)
    data = prepare_data(config, texts)
    model = build_model(config, data.tokenizer)
    n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(model.params)))
    optimizer, schedule = make_optimizer(config.lr, config.warmup_steps, config.steps,
                                         config.min_lr_ratio, config.weight_decay,
                                         config.clip_norm, config.beta2)
    train_step = make_train_step(model.config, optimizer, config.matmul_precision)
    evaluate = make_eval(model.config, precision=config.matmul_precision)
    files.write_config(config.output_dir, {**config.record(), "model_config": model.config.__dict__,
                                           "n_params": n_params, "corpus": data.corpus})

    with RunLog(config, model, data.tokenizer_dir) as log:
        init_loss = evaluate(model.params, data.all_eval)
        logging.info("params=%d unigram=%.4f init held-out=%.4f", n_params, data.unigram,
                     init_loss)
        log.metric(step=0, heldout_loss=init_loss, unigram_loss=data.unigram,
                   time_s=time.time() - t_start)
        if 0 in config.save_steps:
            log.checkpoint(model.params, 0)
        res = train_loop(config, model.params, optimizer.init(model.params), train_step,
                         schedule, evaluate, data, log, t_start)
        final_loss = evaluate(res.params, data.all_eval)
        log.metric(step=res.step, heldout_loss=final_loss, time_s=time.time() - t_start)
        if res.step not in config.save_steps:
            log.checkpoint(res.params, res.step)
        final_dir = log.save(res.params, "final", config.save_dtype)
        stored_loss = evaluate(plateau_jax.load_model(final_dir).params, data.all_eval)
        summary = dict(
            steps=res.step, stopped_early=res.stopped_early, tokens_seen=res.tokens,
            train_seconds=res.train_seconds,
            tokens_per_second=res.tokens / max(res.train_seconds, 1e-9),
            total_seconds=time.time() - t_start, n_params=n_params,
            heldout_windows=int(len(data.all_eval)),
            heldout_tokens_scored=int(data.all_eval[:, 1:].size), unigram_loss=data.unigram,
            init_loss=init_loss, final_loss=final_loss, final_loss_as_stored=stored_loss,
            save_dtype=config.save_dtype,
            weights_bytes=os.path.getsize(os.path.join(final_dir, "model.safetensors")),
            corpus=data.corpus, model_config=model.config.__dict__)
        files.atomic_write_json(os.path.join(config.output_dir, "summary.json"), summary)
    logging.info("Done: %s", summary)
    return (summary, model.replace(params=res.params)) if return_model else summary


SHIPPED_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "tokenizer.json")


def _run_files(run_dir: str):
    """The files :func:`package` reads from a training run; raises if any is missing."""
    src = os.path.join(run_dir, "final")
    need = [os.path.join(src, f) for f in ("config.json", "model.safetensors")] + [
        os.path.join(run_dir, f) for f in ("summary.json", "metrics.jsonl", "config.json")]
    missing = [p for p in need if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run: missing {', '.join(missing)}. Train into "
            "it first (python -m experiments.train --output_dir=...) or pass the right "
            "--output_dir.")
    return src


def check_package_dest(run_dir: str, dest: str, overwrite: bool) -> None:
    """Refuses (before any work) to replace a model in ``dest`` that came from another run,
    unless ``overwrite``; ``dest`` must be creatable and writable."""
    holds_model = any(os.path.exists(os.path.join(dest, f)) for f in SHIPPED_FILES)
    if holds_model and not overwrite:
        same = False
        try:
            with open(os.path.join(dest, "training_summary.json")) as f:
                shipped = json.load(f).get("run_config")
            with open(os.path.join(run_dir, "config.json")) as f:
                same = shipped is not None and shipped == json.load(f)
        except (OSError, ValueError):
            pass
        if not same:
            raise FileExistsError(
                f"--package_to={dest} already holds a model from another training run; pass "
                "--overwrite to replace it, or package into an empty directory.")
    parent = os.path.dirname(os.path.abspath(dest))
    target = dest if os.path.isdir(dest) else parent
    if not os.path.isdir(target) or not os.access(target, os.W_OK):
        raise PermissionError(f"--package_to={dest}: {target} is not a writable directory.")


def package(run_dir: str, dest: str, corpus_dir=None, heldout_per_mille: int = 20,
            sample_chars: int = 30000) -> str:
    """Copies ``run_dir/final`` into ``dest`` for shipping, with ``heldout_sample.txt`` (held-out
    documents the model never saw, one per line), ``LICENSE-WordNet.txt`` and
    ``training_summary.json`` (summary + metrics). Returns ``dest``.

    Every input is read and every output prepared in memory before ``dest`` is touched; each
    file is then replaced atomically (a failure never leaves a truncated file)."""
    from plateau_jax.training import data
    from plateau_jax import files

    src = _run_files(run_dir)
    docs = data.load_documents(corpus_dir)
    _, held = data.split_documents(docs, heldout_per_mille, seed=0)
    sample = data.heldout_sample(held, sample_chars)
    if not sample or not "".join(sample).strip():
        raise ValueError(f"the corpus in {data.find_corpus(corpus_dir)} gives no held-out "
                         "documents for heldout_sample.txt; check --corpus_dir.")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        summary["metrics"] = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_dir, "config.json")) as f:
        summary["run_config"] = json.load(f)
    out = {}
    for name in SHIPPED_FILES:
        if os.path.exists(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as f:
                out[name] = f.read()
    out["heldout_sample.txt"] = ("\n".join(sample) + "\n").encode()
    out["LICENSE-WordNet.txt"] = data.WORDNET_LICENSE.encode()
    out["training_summary.json"] = (json.dumps(summary, indent=2, sort_keys=True, default=str)
                                    + "\n").encode()
    os.makedirs(dest, exist_ok=True)
    for name, payload in out.items():
        files.atomic_write_bytes(os.path.join(dest, name), payload)
    logging.info("Packaged %s into %s", src, dest)
    return dest


def check_flags() -> TrainConfig:
    """Every flag checked before any work (and before anything is written); returns the run's
    :class:`TrainConfig`."""
    from plateau_jax.training import data

    config = config_from_flags()
    if config.tokenizer_dir:
        common.existing_dir("tokenizer_dir", config.tokenizer_dir)
        missing = [f for f in ("vocab.json", "merges.txt")
                   if not os.path.isfile(os.path.join(config.tokenizer_dir, f))]
        if missing:
            raise common.InputError(f"--tokenizer_dir={config.tokenizer_dir} lacks {missing}.")
    if not FLAGS.package_only or FLAGS.package_to:
        data.find_corpus(config.corpus_dir)  # training and packaging both read the corpus
    if FLAGS.package_only:
        if not FLAGS.package_to:
            raise common.InputError("--package_only needs --package_to (where to package to).")
        _run_files(config.output_dir)
    if FLAGS.package_to:
        check_package_dest(config.output_dir, FLAGS.package_to, FLAGS.overwrite)
    return config


def check_run_dir(config: TrainConfig) -> None:
    """Refuses to train into a directory holding a run of another configuration (its
    config.json differs), unless --overwrite."""
    from plateau_jax import files

    path = os.path.join(config.output_dir, "config.json")
    if FLAGS.overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f).get("config", {})
    except (OSError, ValueError):
        old = {}
    new = config.record()
    diffs = files.config_differences({k: old.get(k) for k in new}, new, ignore=("output_dir",))
    if diffs:
        raise files.OutputConflictError(
            f"{config.output_dir} holds a training run with another configuration "
            f"({'; '.join(diffs[:8])}); pass --overwrite to train over it, or use another "
            "--output_dir.")


@common.cli
def main(argv):
    del argv
    config = check_flags()
    common.apply_runtime_flags()
    if not FLAGS.package_only:
        check_run_dir(config)
        train(config)
    if FLAGS.package_to:
        package(config.output_dir, FLAGS.package_to, config.corpus_dir, config.heldout_per_mille)


if __name__ == "__main__":
    define_flags()
    logging.basicConfig(level=logging.INFO)
    common.run(main)
