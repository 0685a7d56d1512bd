"""Flags and set-up shared by every experiment script."""

from __future__ import annotations

import logging
import sys

from absl import flags

import plateau_jax
from plateau_jax import files
from plateau_jax.compilation import DEFAULT_CACHE_DIR, enable_compilation_cache
from plateau_jax.model.core import MATMUL_PRECISIONS
from plateau_jax.model.loading import DEFAULT_MODEL

FLAGS = flags.FLAGS


def define_runtime_flags():
    """--matmul_precision and --compilation_cache (idempotent)."""
    if "matmul_precision" in FLAGS:
        return
    flags.DEFINE_enum("matmul_precision", "highest", list(MATMUL_PRECISIONS),
                      "Precision of every matrix product: 'highest' is exact float32 on every "
                      "backend; 'high', 'tensorfloat32', 'bfloat16' or 'default' are faster "
                      "on GPUs/TPUs and less accurate (docs/numerics.md).")
    flags.DEFINE_string("compilation_cache", DEFAULT_CACHE_DIR,
                        "Persistent XLA compilation cache directory (a second run of the same "
                        "configuration skips compilation); empty to turn it off.")


def apply_runtime_flags() -> None:
    """Turns on the compilation cache (call before any JAX computation)."""
    path = enable_compilation_cache(FLAGS.compilation_cache)
    logging.info("compilation cache: %s", path or "off")


def define_model_flags():
    """--model, --dtype, --ln_mode, --center_writing_weights, --allow_pickle, --output_dir and
    the runtime flags (:func:`define_runtime_flags`).

    Idempotent, so several experiment modules can be imported into one process."""
    define_runtime_flags()
    if "model" in FLAGS:
        return
    flags.DEFINE_string("model", DEFAULT_MODEL,
                        "Hub id (gpt2, gpt2-large, ...), local checkpoint directory, or shipped name.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Params/compute dtype.")
    flags.DEFINE_enum("ln_mode", "auto", ["auto", "normal", "identity"],
                      "LayerNorm handling; auto = identity for LayerNorm-free checkpoints.")
    flags.DEFINE_bool("center_writing_weights", False,
                      "TransformerLens' weight centring (the study's residual numbers carry it).")
    flags.DEFINE_bool("allow_pickle", False, "Accept pickle-only (pytorch_model.bin) checkpoints.")
    flags.DEFINE_string("output_dir", None, "Directory for config.json, results and figures.")
    flags.mark_flag_as_required("output_dir")


def load_model_from_flags() -> plateau_jax.GPT2:
    apply_runtime_flags()
    logging.info("Loading %s", FLAGS.model)
    return plateau_jax.load_model(FLAGS.model, dtype=FLAGS.dtype, ln_mode=FLAGS.ln_mode,
                                  center_writing_weights=FLAGS.center_writing_weights,
                                  allow_pickle=FLAGS.allow_pickle,
                                  matmul_precision=FLAGS.matmul_precision)


def resolved_flags(module_names=None) -> dict:
    """Every flag defined by the experiment modules (and common), name -> value."""
    out = {}
    for module, fl in FLAGS.flags_by_module_dict().items():
        # absl files the flags of a script run as __main__ (python -m) under sys.argv[0].
        if module_names is None and not (module.startswith(("experiments", "__main__"))
                                         or module == sys.argv[0]):
            continue
        if module_names is not None and module not in module_names:
            continue
        out.update({f.name: f.value for f in fl})
    return dict(sorted(out.items()))


def start_run(model: plateau_jax.GPT2) -> str:
    """Prepares the output directory and writes config.json (flags + model + versions)."""
    out = files.prepare_output_dir(FLAGS.output_dir)
    resolved = resolved_flags()
    resolved["model_config"] = model.config.__dict__
    path = files.write_config(out, resolved)
    logging.info("Resolved config written to %s: %s", path, resolved)
    return out
