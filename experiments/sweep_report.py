"""Writes the report of a sweep directory: ``python -m experiments.sweep_report --output_dir=DIR``."""

from absl import app, flags

flags.DEFINE_string("output_dir", None, "A sweep's output directory.")
flags.DEFINE_bool("figures", True, "Also draw the figures.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plateau_jax.sweep import report

    for k, v in report.write_report(FLAGS.output_dir, figures=FLAGS.figures).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main)
