"""Writes the report of a sweep directory: ``python -m experiments.sweep_report --output_dir=DIR``.

The report (``DIR/report/``: summary.md, summary.csv, stats.csv and figures) is published
atomically; a partial sweep gets a report that says it is incomplete.
"""

from absl import flags

from experiments import common

flags.DEFINE_string("output_dir", None, "A sweep's output directory.")
flags.DEFINE_bool("figures", True, "Also draw the figures.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


@common.cli
def main(argv):
    del argv
    from plateau_jax.sweep import report

    for k, v in report.write_report(FLAGS.output_dir, figures=FLAGS.figures).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    common.run(main)
