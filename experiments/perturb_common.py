"""Flags and set-up shared by ``experiments.directions`` and ``experiments.slices``: the site,
the reference set (its typical distance D is the unit of every length), prompts, errors."""

from __future__ import annotations

import logging
import os
from typing import List, Sequence

import numpy as np
from absl import flags

from experiments import common
from plateau_jax.model.sites import RESIDUAL_SITES
from plateau_jax.plateaus import reference as reference_lib

FLAGS = flags.FLAGS
SHIPPED_TEXT = os.path.join(os.path.dirname(reference_lib.__file__), os.pardir, "assets",
                            "tiny-plateau", "heldout_sample.txt")
SHIPPED_TEXT = os.path.normpath(SHIPPED_TEXT)


InputError = common.InputError


def define_flags():
    """Model flags plus the site, reference and batching flags (idempotent)."""
    common.define_model_flags()
    if "site" in FLAGS:
        return
    flags.DEFINE_integer("layer", 1, "Layer of the perturbed site.")
    flags.DEFINE_enum("site", "resid_pre", list(RESIDUAL_SITES),
                      "Perturbed residual site: blocks.{layer}.hook_{site}.")
    flags.DEFINE_string("reference", None,
                        "A reference.npz of an earlier run (mean, covariance, typical distance D "
                        "at the same layer and site) to reuse instead of collecting one.")
    flags.DEFINE_string("reference_file", SHIPPED_TEXT,
                        "Text file, one prompt per line: the reference activations (their mean, "
                        "covariance and median pairwise distance D, the unit of every length).")
    flags.DEFINE_enum("reference_positions", "all", list(reference_lib.POSITIONS),
                      "Reference rows: every position after the first of each line, or the last.")
    flags.DEFINE_integer("reference_max_prompts", 2000, "Use at most this many reference lines.")
    flags.DEFINE_integer("max_tokens", 32, "Truncate every prompt to its first N tokens.")
    flags.DEFINE_integer("batch_size", 8, "Base points (or prompts) per compiled call.")
    flags.DEFINE_integer("seed", 0, "Seed of every random draw (directions, prompt sample).")
    flags.DEFINE_enum("figure_format", "png", ["png", "pdf", "svg"], "Figure file format.")


def check_common_flags() -> None:
    """Every shared flag that can be checked without the model."""
    if FLAGS.layer < 0:
        raise InputError(f"--layer={FLAGS.layer}: expected a layer number >= 0.")
    for name in ("max_tokens", "batch_size", "reference_max_prompts"):
        if getattr(FLAGS, name) < 1:
            raise InputError(f"--{name}={getattr(FLAGS, name)}: expected a positive integer.")
    if FLAGS.max_tokens < 2:
        raise InputError("--max_tokens must be >= 2 (a base point continues earlier tokens).")
    if FLAGS.reference:
        if not os.path.isfile(FLAGS.reference):
            raise InputError(f"--reference={FLAGS.reference!r} does not exist.")
    elif not os.path.isfile(FLAGS.reference_file):
        raise InputError(f"--reference_file={FLAGS.reference_file!r} does not exist; pass a "
                         "text file with one prompt per line.")




def reference_from_flags(model, out_dir: str) -> reference_lib.Reference:
    """Loads ``--reference`` (checked against the layer and site) or collects one from
    ``--reference_file`` into ``out_dir`` (reference.npz, reference_activations.npy)."""
    if FLAGS.reference:
        ref = reference_lib.Reference.load(FLAGS.reference)
        if (ref.layer, ref.site, ref.d) != (FLAGS.layer, FLAGS.site, model.config.d_model):
            raise InputError(f"--reference={FLAGS.reference!r} is for blocks.{ref.layer}.hook_"
                             f"{ref.site} (d={ref.d}); this run perturbs blocks.{FLAGS.layer}."
                             f"hook_{FLAGS.site} (d={model.config.d_model}).")
        ref.save(os.path.join(out_dir, "reference.npz"))
        return ref
    texts = reference_lib.read_prompts(FLAGS.reference_file)[: FLAGS.reference_max_prompts]
    prompts, _ = reference_lib.tokenize_prompts(model, texts, FLAGS.max_tokens)
    ref, _ = reference_lib.build_reference(
        model, prompts, FLAGS.layer, FLAGS.site, positions=FLAGS.reference_positions,
        batch_size=max(FLAGS.batch_size, 16), out_dir=out_dir,
        progress_desc="reference activations", seed=FLAGS.seed)
    logging.info("reference: %d activations, D = %.4g", ref.n, ref.typical_distance)
    return ref


def run(name: str, module_name: str, check_flags, compute) -> str:
    """A perturbation script's main: checks the flags and any run published in
    ``--output_dir/<name>`` (before loading anything), loads the model, checks the layer, stages
    the reference and ``compute(model, reference, staging_dir)``'s files, and publishes them
    together. Returns the published directory."""
    check_flags()
    common.check_layer_early(common.check_layer_flag)
    pub = common.open_publication(name, module_name, __name__)
    model = common.load_model_from_flags()
    common.check_layer_flag(model.config.n_layer)
    with pub.staging() as out:
        compute(model, reference_from_flags(model, out), out)
        published = pub.commit(extra=common.model_record(model))
    logging.info("Published %s", published)
    return published


def split_prompts(spec: str) -> List[str]:
    """``"a|b|c"`` -> ``["a", "b", "c"]`` (prompts may contain commas), blanks dropped."""
    return [p.strip() for p in spec.split("|") if p.strip()]


def tokens_of(model, texts: Sequence[str], what: str) -> List[np.ndarray]:
    prompts, kept = reference_lib.tokenize_prompts(model, texts, FLAGS.max_tokens, 2)
    if len(kept) < len(texts):
        bad = [texts[i] for i in range(len(texts)) if i not in set(kept)]
        raise InputError(f"{what}: {bad[:3]} tokenise to fewer than 2 tokens; a base point needs "
                         "a token before the perturbed one.")
    return prompts
