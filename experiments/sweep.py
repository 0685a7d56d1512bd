r"""Plateau statistics over many prompt pairs, sharded over every device, resumable.

  python -m experiments.sweep --model=gpt2 --pairs_file=pairs.jsonl --layers=0 --output_dir=runs/s
  python -m experiments.sweep --model=gpt2 --generate=topk --context="The house was" --k=20 ...
  python -m experiments.sweep --generate=random --n_pairs=1000 --context="The house was" ...
  python -m experiments.sweep --generate=text --text_file=book.txt --n_pairs=1000 ...
  python -m experiments.sweep --output_dir=runs/s --report_only      # (re)write the report

Rerunning the same command resumes (finished shards are skipped); another configuration in the
same --output_dir is refused. Multi-host: add --distributed (calls jax.distributed.initialize()).
See the README.
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags

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
flags.DEFINE_integer("batch_size", 64, "Pairs per batch (= per shard file); padded to a multiple "
                     "of the device count.")
flags.DEFINE_float("plateau_tol", 0.05, "Plateau: r within this of an endpoint.")
flags.DEFINE_float("plateau_width", 0.5, "A pair has a plateau when the widths sum to >= this.")
flags.DEFINE_integer("max_pairs", None, "Use only the first N valid pairs.")
flags.DEFINE_bool("report_only", False, "Only (re)write the report of --output_dir.")
flags.DEFINE_bool("report", True, "Write the report when the sweep is complete.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def _generate(model, out_dir):
    from plateau_jax.sweep import inputs

    if FLAGS.generate == "topk":
        rows, skipped = inputs.topk_pairs(model, FLAGS.context[0], FLAGS.k, FLAGS.topk_mode)
    elif FLAGS.generate == "random":
        words = None
        if FLAGS.word_list:
            with open(FLAGS.word_list, encoding="utf-8") as f:
                words = [w for w in f.read().splitlines() if w.strip()]
        rows, skipped = inputs.random_pairs(model, FLAGS.context, FLAGS.n_pairs, FLAGS.seed, words)
    else:
        if not FLAGS.text_file:
            raise app.UsageError("--generate=text needs --text_file.")
        with open(FLAGS.text_file, encoding="utf-8") as f:
            text = f.read()
        rows, skipped = inputs.text_pairs(model, text, FLAGS.max_context, FLAGS.min_context,
                                          FLAGS.stride, limit=FLAGS.n_pairs)
    path = os.path.join(out_dir, "input_pairs.jsonl")
    inputs.write_pairs_jsonl(path, rows)
    from plateau_jax.files import atomic_write_bytes
    atomic_write_bytes(os.path.join(out_dir, "generator_skipped.jsonl"), "".join(
        json.dumps({"candidate": c, "reason": r}) + "\n" for c, r in skipped).encode())
    logging.info("generated %d pairs (%d candidates skipped, see generator_skipped.jsonl)",
                 len(rows), len(skipped))
    return path


def main(argv):
    del argv
    if FLAGS.distributed and not FLAGS.report_only:  # before any other JAX call
        import jax
        jax.distributed.initialize()
    from plateau_jax.sweep import report

    if FLAGS.report_only:
        paths = report.write_report(FLAGS.output_dir)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return
    from plateau_jax import files
    from plateau_jax.sweep import SweepSpec, inputs, runner

    if bool(FLAGS.pairs_file) == bool(FLAGS.generate):
        raise app.UsageError("give exactly one of --pairs_file or --generate.")
    model = common.load_model_from_flags()
    out = files.prepare_output_dir(FLAGS.output_dir)
    path = FLAGS.pairs_file or _generate(model, out)
    rows, errors = inputs.read_pairs_file(path)
    pairs, enc_errors = inputs.encode_rows(model.tokenizer, rows, model.config.n_positions)
    errors = errors + enc_errors
    for e in errors:
        logging.warning("%s line %d skipped: %s", path, e.line, e.reason)
    if FLAGS.max_pairs is not None:
        pairs = pairs[:FLAGS.max_pairs]
    if not pairs:
        raise app.UsageError(f"no valid pairs in {path} ({len(errors)} rejected; see the log).")
    spec = SweepSpec(layers=tuple(int(l) for l in FLAGS.layers), n_steps=FLAGS.n_steps,
                     path=FLAGS.path, component=FLAGS.component, tol=FLAGS.tol)
    summary = runner.run_sweep(model, pairs, spec, out, batch_size=FLAGS.batch_size,
                               plateau_tol=FLAGS.plateau_tol, plateau_width=FLAGS.plateau_width,
                               input_errors=errors)
    logging.info("sweep done: %s", summary)
    print(json.dumps(summary))
    if FLAGS.report:
        import jax
        if jax.process_index() == 0:
            for k, v in report.write_report(out).items():
                print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main)
