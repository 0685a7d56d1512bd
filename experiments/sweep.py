r"""Plateau statistics over many prompt pairs, sharded over every device, resumable.

  python -m experiments.sweep --model=gpt2 --pairs_file=pairs.jsonl --layers=0 --output_dir=runs/s
  python -m experiments.sweep --model=gpt2 --generate=topk --context="The house was" --k=20 ...
  python -m experiments.sweep --generate=random --n_pairs=1000 --context="The house was" ...
  python -m experiments.sweep --generate=text --text_file=book.txt --n_pairs=1000 ...
  python -m experiments.sweep --output_dir=runs/s --report_only      # (re)write the report

Rerunning the same command resumes (finished shards are skipped); another configuration in the
same --output_dir is refused before anything is written (--overwrite deletes the old sweep
instead). Every flag and input file is checked before the model loads. Multi-host: add
--distributed (calls jax.distributed.initialize()). See the README.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_model_flags()
flags.DEFINE_string("pairs_file", None, "JSONL or CSV of context, ending_a, ending_b.")
flags.DEFINE_enum("generate", None, ["topk", "random", "text"],
                  "Generate pairs instead of --pairs_file (written to output_dir/input_pairs.jsonl).")
flags.DEFINE_multi_string("context", ["The house was"], "Context(s) for --generate=topk/random.")
flags.DEFINE_integer("k", 10, "topk: number of top next tokens.")
flags.DEFINE_enum("topk_mode", "all", ["all", "top1"], "topk: all pairs among them, or top-1 vs rest.")
flags.DEFINE_integer("n_pairs", 1000, "random/text: number of pairs.")
flags.DEFINE_integer("seed", 0, "random: RNG seed.")
flags.DEFINE_string("word_list", None, "random: file with one word per line (default: vocabulary).")
flags.DEFINE_string("text_file", None, "text: plain text file.")
flags.DEFINE_integer("max_context", 32, "text: window length in tokens.")
flags.DEFINE_integer("min_context", 2, "text: first position used in each window.")
flags.DEFINE_integer("stride", 1, "text: use every stride-th position.")
flags.DEFINE_list("layers", ["0"], "Interpolation layers (blocks.L.hook_resid_post).")
flags.DEFINE_integer("n_steps", 50, "Alpha grid size (linspace(0, 1, n_steps)).")
flags.DEFINE_enum("path", "slerp", ["slerp", "linear"], "Interpolation path.")
flags.DEFINE_enum("component", "resid_post",
                  ["resid_post", "resid_mid", "attn_out", "mlp_out", "mlp_post", "mlp_pre"],
                  "Per-layer vector whose relative distance r is measured.")
flags.DEFINE_float("tol", 1e-3, "Boundary refinement tolerance on alpha (0: no refinement).")
flags.DEFINE_float("sharpness_width", 0.02,
                   "Alpha-width w of the refined sharpness S_ref: the slope of r (and d) over the "
                   "window of width w centred on the refined boundary (>= 2 tol).")
flags.DEFINE_enum("refine", "logits", ["logits", "all"],
                  "Targets whose boundary is refined and whose S_ref is measured: the logits (a "
                  "handful of extra rows per pair), or every layer too (several times the cost "
                  "of the curves themselves).")
flags.DEFINE_integer("batch_size", 64, "Pairs per batch (= per shard file); padded to a multiple "
                     "of the device count.")
flags.DEFINE_float("plateau_tol", 0.05, "Plateau: r within this of an endpoint.")
flags.DEFINE_float("plateau_width", 0.5, "A pair has a plateau when the widths sum to >= this.")
flags.DEFINE_integer("max_pairs", None, "Use only the first N valid pairs.")
flags.DEFINE_bool("report_only", False, "Only (re)write the report of --output_dir.")
flags.DEFINE_bool("report", True, "Write the report when the sweep is complete.")
flags.DEFINE_bool("distributed", False,
                  "Multi-host: call jax.distributed.initialize() first; every process runs the same "
                  "command (see docs/sweeps.md).")
flags.DEFINE_string("coordinator_address", None,
                    "--distributed: host:port of process 0 (default: detected from the cluster "
                    "environment, e.g. SLURM or a TPU pod).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes (default: detected).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index (default: detected).")


InputError = common.InputError


def _read_text(name: str, path: str) -> str:
    common.existing_file(name, path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"--{name}={path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_flags():
    """Every check that needs neither the model nor the pairs' tokens. Returns (spec, input
    config, rows of --pairs_file or None, their parse errors, word list, text)."""
    from plateau_jax.sweep import SweepSpec, inputs

    if bool(FLAGS.pairs_file) == bool(FLAGS.generate):
        raise InputError("give exactly one of --pairs_file (a JSONL/CSV file of pairs) or "
                         "--generate=topk|random|text.")
    try:
        layers = tuple(int(l) for l in FLAGS.layers)
    except ValueError:
        raise InputError(f"--layers={','.join(FLAGS.layers)}: expected layer numbers, e.g. "
                         "--layers=0,6.") from None
    common.positive("batch_size", FLAGS.batch_size)
    if FLAGS.max_pairs is not None:
        common.positive("max_pairs", FLAGS.max_pairs)
    if not 0 < FLAGS.plateau_tol < 0.5:
        raise InputError(f"--plateau_tol={FLAGS.plateau_tol}: expected 0 < tol < 0.5.")
    if not 0 < FLAGS.plateau_width <= 1:
        raise InputError(f"--plateau_width={FLAGS.plateau_width}: expected 0 < width <= 1.")
    try:
        spec = SweepSpec(layers=layers, n_steps=FLAGS.n_steps, path=FLAGS.path,
                         component=FLAGS.component, tol=FLAGS.tol,
                         sharpness_width=FLAGS.sharpness_width, refine=FLAGS.refine)
    except ValueError as e:
        raise InputError(f"sweep settings (--layers, --n_steps, --tol, --sharpness_width): {e}") from None
    n_layer = common.peek_n_layer(FLAGS.model)
    if n_layer is not None:
        check_layers(spec, n_layer)
    rows = errors = words = text = None
    source = {"max_pairs": FLAGS.max_pairs}
    if FLAGS.pairs_file:
        common.existing_file("pairs_file", FLAGS.pairs_file)
        try:
            fmt = inputs.detect_format(FLAGS.pairs_file)
        except ValueError as e:
            raise InputError(f"--pairs_file: {e}") from None
        rows, errors = inputs.parse_pairs_text(_read_text("pairs_file", FLAGS.pairs_file), fmt)
        if not rows:
            first = f" (line {errors[0].line}: {errors[0].reason})" if errors else ""
            raise InputError(f"--pairs_file={FLAGS.pairs_file}: no readable pairs{first}.")
        source.update(source="pairs_file")
    else:
        source.update(source="generate", generate=FLAGS.generate)
        if FLAGS.generate in ("topk", "random"):
            if not FLAGS.context or any(not c.strip() for c in FLAGS.context):
                raise InputError("--context: give non-empty contexts, e.g. --context='The house was'.")
            source.update(context=FLAGS.context if FLAGS.generate == "random" else FLAGS.context[:1])
        if FLAGS.generate == "topk":
            common.positive("k", FLAGS.k, 2)
            source.update(k=FLAGS.k, topk_mode=FLAGS.topk_mode)
        elif FLAGS.generate == "random":
            common.positive("n_pairs", FLAGS.n_pairs)
            source.update(n_pairs=FLAGS.n_pairs, seed=FLAGS.seed)
            if FLAGS.word_list:
                wl = _read_text("word_list", FLAGS.word_list)
                words = [w for w in wl.splitlines() if w.strip()]
                if len(words) < 2:
                    raise InputError(f"--word_list={FLAGS.word_list}: needs at least two words, "
                                     "one per line.")
                source.update(word_list_sha256=_sha(wl))
        else:
            if not FLAGS.text_file:
                raise InputError("--generate=text needs --text_file (a plain text file).")
            text = _read_text("text_file", FLAGS.text_file)
            common.positive("n_pairs", FLAGS.n_pairs)
            common.positive("max_context", FLAGS.max_context, 2)
            common.positive("min_context", FLAGS.min_context)
            common.positive("stride", FLAGS.stride)
            if FLAGS.min_context >= FLAGS.max_context:
                raise InputError(f"--min_context={FLAGS.min_context} must be below "
                                 f"--max_context={FLAGS.max_context}.")
            source.update(n_pairs=FLAGS.n_pairs, text_sha256=_sha(text),
                          max_context=FLAGS.max_context, min_context=FLAGS.min_context,
                          stride=FLAGS.stride)
    return spec, source, rows, errors, words, text


def check_layers(spec, n_layer: int) -> None:
    bad = [l for l in spec.layers if not 0 <= l < n_layer]
    if bad:
        raise InputError(f"--layers={','.join(map(str, spec.layers))}: layers {bad} are out of "
                         f"range; this model has layers 0..{n_layer - 1}.")


def _generate(model, words, text):
    """Generated rows (in memory; written to input_pairs.jsonl only once the configuration has
    been checked) and the skipped candidates."""
    from plateau_jax.sweep import inputs

    if FLAGS.generate == "topk":
        rows, skipped = inputs.topk_pairs(model, FLAGS.context[0], FLAGS.k, FLAGS.topk_mode)
    elif FLAGS.generate == "random":
        rows, skipped = inputs.random_pairs(model, FLAGS.context, FLAGS.n_pairs, FLAGS.seed, words)
    else:
        rows, skipped = inputs.text_pairs(model, text, FLAGS.max_context, FLAGS.min_context,
                                          FLAGS.stride, limit=FLAGS.n_pairs)
    # Line numbers as in the input_pairs.jsonl that will be written.
    jsonl = "".join(json.dumps(r.as_json(), ensure_ascii=False) + "\n" for r in rows)
    rows, errors = inputs.parse_pairs_text(jsonl, "jsonl")
    logging.info("generated %d pairs (%d candidates skipped, see generator_skipped.jsonl)",
                 len(rows), len(skipped))
    return rows, errors, jsonl, skipped


def _write_generated(out, jsonl, skipped):
    from plateau_jax import files

    files.atomic_write_bytes(os.path.join(out, "input_pairs.jsonl"), jsonl.encode("utf-8"))
    files.atomic_write_bytes(os.path.join(out, "generator_skipped.jsonl"), "".join(
        json.dumps({"candidate": c, "reason": r}) + "\n" for c, r in skipped).encode())


def _print_report(paths):
    for k, v in paths.items():
        print(f"{k}: {v}")


@common.cli
def main(argv):
    del argv
    from plateau_jax import files
    from plateau_jax.sweep import report

    if FLAGS.report_only:
        _print_report(report.write_report(FLAGS.output_dir))
        return
    # Everything that can be checked without the model, before loading it (and before writing).
    spec, source, rows, errors, words, text = check_flags()
    from plateau_jax.sweep import runner
    early = runner.early_config(spec, FLAGS.batch_size, FLAGS.plateau_tol, FLAGS.plateau_width,
                                {"input": source})
    if not FLAGS.overwrite:
        runner.check_output(FLAGS.output_dir, early, keys=runner.EARLY_KEYS)
    out = files.prepare_output_dir(FLAGS.output_dir)
    if FLAGS.distributed:  # before any other JAX call
        import jax
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    from plateau_jax.sweep import inputs

    model = common.load_model_from_flags()
    check_layers(spec, model.config.n_layer)
    if model.tokenizer is None:
        raise InputError(f"{FLAGS.model} has no tokenizer files; the prompts need one.")
    write_generated = None
    path = FLAGS.pairs_file
    if FLAGS.generate:
        rows, errors, jsonl, skipped = _generate(model, words, text)
        write_generated = lambda: _write_generated(out, jsonl, skipped)
        path = os.path.join(out, "input_pairs.jsonl")
    pairs, enc_errors = inputs.encode_rows(model.tokenizer, rows, model.config.n_positions)
    errors = errors + enc_errors
    for e in errors:
        logging.warning("%s line %d skipped: %s", path, e.line, e.reason)
    if FLAGS.max_pairs is not None:
        pairs = pairs[:FLAGS.max_pairs]
    if not pairs:
        first = f"; line {errors[0].line}: {errors[0].reason}" if errors else ""
        raise InputError(f"no valid pairs in {path} ({len(errors)} rejected{first}).")
    summary = runner.run_sweep(model, pairs, spec, out, batch_size=FLAGS.batch_size,
                               plateau_tol=FLAGS.plateau_tol, plateau_width=FLAGS.plateau_width,
                               input_errors=errors, extra_config={"input": source},
                               overwrite=FLAGS.overwrite, before_write=write_generated)
    logging.info("sweep done: %s", summary)
    print(json.dumps(summary))
    if FLAGS.report:
        import jax
        if jax.process_index() == 0:
            _print_report(report.write_report(out))


if __name__ == "__main__":
    common.run(main)
