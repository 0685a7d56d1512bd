"""Flags, errors and output handling shared by every experiment script.

* :func:`run` replaces ``app.run``: bad flags, bad input and failures the user can fix end the
  script with one line ``error: ...`` on stderr and exit status 1 (130 when interrupted), never a
  traceback (``--verbosity=1`` logs the traceback too). ``~`` in path flags is expanded.
* :func:`open_publication` checks the output directory and the configuration of any run
  already published there *before* any work, and stages the new run for atomic publication
  (:class:`plateau_jax.files.Publication`).
* Small validators (:func:`positive`, :func:`existing_file`, ...) raise :class:`InputError`
  naming the flag.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

from absl import app, flags

import plateau_jax
from plateau_jax import files
from plateau_jax.compilation import DEFAULT_CACHE_DIR, enable_compilation_cache
from plateau_jax.model.core import MATMUL_PRECISIONS
from plateau_jax.model.loading import DEFAULT_MODEL

FLAGS = flags.FLAGS

# Flags holding paths: a leading ~ is expanded (the shell does not expand --flag=~/x).
PATH_FLAGS = ("model", "output_dir", "pairs_file", "word_list", "text_file", "run_dir",
              "reference", "reference_file", "prompts_file",
              "corpus_dir", "tokenizer_dir", "package_to", "checkpoints")
# Flags that do not change what a run computes, left out of the configuration comparison.
NOT_CONFIG = ("output_dir", "overwrite", "compilation_cache")


class InputError(ValueError):
    """A flag value or input file that cannot be used; the message says what to pass instead."""


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
    """--model, --dtype, --ln_mode, --center_writing_weights, --allow_pickle, --output_dir,
    --overwrite and the runtime flags (:func:`define_runtime_flags`).

    Idempotent, so several experiment modules can be imported into one process."""
    define_runtime_flags()
    if "model" in FLAGS:
        return
    flags.DEFINE_string("model", DEFAULT_MODEL,
                        "Hub id (gpt2, gpt2-large, ...), local checkpoint directory, or shipped name.")
    flags.DEFINE_string("revision", None, "Hub revision of --model: a branch, tag or commit "
                        "(e.g. Pythia's training checkpoints step0 ... step143000).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Params/compute dtype.")
    flags.DEFINE_enum("ln_mode", "auto", ["auto", "normal", "identity"],
                      "LayerNorm handling; auto = identity for LayerNorm-free checkpoints.")
    flags.DEFINE_bool("center_writing_weights", False,
                      "TransformerLens' weight centring (the study's residual numbers carry it).")
    flags.DEFINE_bool("allow_pickle", False, "Accept pickle-only (pytorch_model.bin) checkpoints.")
    flags.DEFINE_string("output_dir", None, "Directory for config.json, results and figures.")
    define_overwrite_flag()
    flags.mark_flag_as_required("output_dir")


def define_overwrite_flag():
    if "overwrite" not in FLAGS:
        flags.DEFINE_bool("overwrite", False,
                          "Replace results of another configuration in --output_dir (without it, "
                          "such a directory is refused before any work).")


def load_model_from_flags() -> plateau_jax.Model:
    apply_runtime_flags()
    logging.info("Loading %s", FLAGS.model)
    return plateau_jax.load_model(FLAGS.model, dtype=FLAGS.dtype, ln_mode=FLAGS.ln_mode,
                                  center_writing_weights=FLAGS.center_writing_weights,
                                  allow_pickle=FLAGS.allow_pickle, revision=FLAGS.revision,
                                  matmul_precision=FLAGS.matmul_precision)


def resolved_flags(module_names=None) -> dict:
    """Every flag defined by the experiment modules (and common), name -> value.

    ``module_names``: only the flags of these modules (a script run with ``python -m`` files its
    flags under ``__main__``'s path, ``sys.argv[0]``; ``"__main__"`` stands for that)."""
    out = {}
    names = None
    if module_names is not None:
        names = set(module_names)
        if "__main__" in names:
            names.add(sys.argv[0])
    for module, fl in FLAGS.flags_by_module_dict().items():
        if names is None and not (module.startswith(("experiments", "__main__"))
                                  or module == sys.argv[0]):
            continue
        if names is not None and module not in names:
            continue
        out.update({f.name: f.value for f in fl})
    return dict(sorted(out.items()))


def script_config(*module_names: str) -> dict:
    """The resolved flags of one script (its modules' and the shared ones): its configuration."""
    return resolved_flags([*module_names, __name__])


# ----------------------------------------------------------------------------- errors

def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror and str(e.filename) not in e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e) or type(e).__name__
    if isinstance(e, KeyError) and len(e.args) == 1 and text == repr(e.args[0]):
        text = str(e.args[0])
    return text


# Errors a user can act on (bad flags, files, configurations, numerics, resources). Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, MemoryError, RuntimeError,
               plateau_jax.UnknownSiteError, app.UsageError, flags.Error)


def cli(main: Callable) -> Callable:
    """Wraps a script's ``main``: expands ``~`` in path flags, and turns user errors into
    ``SystemExit("error: ...")`` (stderr, exit status 1) and Ctrl-C into exit status 130."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            if len(argv) > 1:
                raise InputError(f"unexpected arguments {argv[1:]}; flags are written "
                                 "--name=value.")
            expand_user_paths()
            return main(argv)
        except KeyboardInterrupt:
            logging.debug("interrupted", exc_info=True)
            sys.stderr.write("error: interrupted; published outputs are only ever replaced "
                             "whole: each is the previous complete run, or this one if it had "
                             "already been published.\n")
            raise SystemExit(130)
        except USER_ERRORS as e:
            logging.debug("failed", exc_info=True)
            raise SystemExit(f"error: {_message(e)}")

    wrapped._cli = True
    return wrapped


def parse_flags(argv):
    """``app.run``'s flag parser, with ``error: ...`` instead of absl's FATAL message."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        text = " ".join(str(e).split())
        required = re.search(r"Flag --(\w+) must have a value other than None", text)
        if required:
            text = f"--{required.group(1)} is required"
        sys.stderr.write(f"error: {text} (see --helpfull)\n")
        sys.exit(1)


def run(main: Callable) -> None:
    """``app.run(main)`` with :func:`cli` (unless ``main`` already has it) and
    :func:`parse_flags`."""
    app.run(main if getattr(main, "_cli", False) else cli(main), flags_parser=parse_flags)


def expand_user_paths(names: Iterable[str] = PATH_FLAGS) -> None:
    for name in names:
        if name not in FLAGS:
            continue
        value = FLAGS[name].value
        if isinstance(value, str) and value.startswith("~"):
            FLAGS[name].value = os.path.expanduser(value)
        elif isinstance(value, list):
            FLAGS[name].value = [os.path.expanduser(v) if isinstance(v, str) else v for v in value]


# ----------------------------------------------------------------------------- validators

def positive(name: str, value, minimum=1, what: str = "an integer") -> None:
    if value is None or value < minimum:
        raise InputError(f"--{name}={value}: expected {what} >= {minimum}.")


def existing_file(name: str, path: Optional[str]) -> str:
    if not path:
        raise InputError(f"--{name} is required.")
    if not os.path.isfile(path):
        raise InputError(f"--{name}={path}: no such file.")
    if not os.access(path, os.R_OK):
        raise InputError(f"--{name}={path}: the file cannot be read.")
    return path


def existing_dir(name: str, path: Optional[str]) -> str:
    if not path:
        raise InputError(f"--{name} is required.")
    if not os.path.isdir(path):
        raise InputError(f"--{name}={path}: no such directory.")
    return path


def subset(name: str, values: Sequence[str], allowed: Sequence[str], nonempty=True) -> tuple:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise InputError(f"--{name}: unknown {bad}; choose from {list(allowed)}.")
    if nonempty and not values:
        raise InputError(f"--{name} is empty; choose from {list(allowed)}.")
    return tuple(values)


def peek_n_layer(model: str) -> Optional[int]:
    """``n_layer`` from the ``config.json`` of a local or shipped checkpoint, read without
    loading the weights (None for a hub id): lets layer flags be checked before the model
    loads. An unreadable or unsupported config is an error here already."""
    from plateau_jax.model import loading, shipped

    directory = os.path.expanduser(model) if os.path.isdir(os.path.expanduser(model)) else \
        shipped.shipped_models().get(model)
    if directory is None:
        return None
    return loading.read_config(directory).n_layer


def check_layer_flag(n_layer: int) -> None:
    """--layer must be a layer of a model with ``n_layer`` layers."""
    if not 0 <= FLAGS.layer < n_layer:
        raise InputError(f"--layer={FLAGS.layer} is out of range: this model has layers "
                         f"0..{n_layer - 1}.")


def check_layer_early(check: Callable[[int], object]) -> None:
    """``--layer`` >= 0, and ``check(n_layer)`` when the depth can be read without loading the
    model (:func:`peek_n_layer`)."""
    if FLAGS.layer < 0:
        raise InputError(f"--layer={FLAGS.layer}: expected a layer number >= 0.")
    n_layer = peek_n_layer(FLAGS.model)
    if n_layer is not None:
        check(n_layer)


def load_model_and_prompts(pub: files.Publication, pair_specs, check: Callable = None):
    """Loads the model, runs ``check(model)`` and encodes ``--context`` with each of
    ``pair_specs``; returns ``(model, pairs, check's result)``. Releases ``pub`` (its lock) if
    anything fails, so the refusal leaves nothing behind."""
    from plateau_jax.plateaus import prompts

    try:
        model = load_model_from_flags()
        checked = check(model) if check is not None else None
        if model.tokenizer is None:
            raise InputError(f"{FLAGS.model} has no tokenizer files; the prompts need one.")
        pairs = prompts.encode_pairs(model.tokenizer, FLAGS.context, pair_specs,
                                     model.config.n_positions)
    except BaseException:
        pub.release()
        raise
    return model, pairs, checked


# ----------------------------------------------------------------------------- output

def open_publication(name: str, *module_names: str) -> files.Publication:
    """Checks ``--output_dir`` and any run published in ``--output_dir/<name>`` against this
    script's configuration (refused without ``--overwrite`` if it differs), before any work."""
    return files.Publication(FLAGS.output_dir, name, script_config(*module_names),
                             overwrite=FLAGS.overwrite, ignore=NOT_CONFIG)


def model_record(model: plateau_jax.Model) -> dict:
    return {"model_config": model.config.__dict__, "model_name": model.name,
            "model_dtype": str(model.dtype)}
