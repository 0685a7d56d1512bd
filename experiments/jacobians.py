r"""Jacobian norms along interpolation paths: MLP, attention, layer, products and cumulative.

    python -m experiments.jacobians --output_dir=out/jac
    python -m experiments.jacobians --flagfile=experiments/flags/jacobians_study.flags \
        --output_dir=out/jac_study

For each prompt pair: interpolate ``blocks.{layer}.hook_{site}`` between the two endings, then
one jitted call (:func:`plateau_jax.jacobians.jacobian_sweep`) gives the requested norms of every
per-layer Jacobian at every step, the study's skip-free products and the end-to-end cumulative
Jacobians at every depth. Publishes ``jacobians_{A}-{B}.npz`` and figures per pair (see the
README for the array names and shapes) and ``config.json`` together in
``--output_dir/jacobians/`` (staged, then one atomic switch).

The path is built exactly as ``experiments.plateaus`` builds it (endpoints from
:func:`plateau_jax.plateaus.interpolation.endpoint_activations`, path in float64 on the host by
:func:`plateau_jax.plateaus.paths.interpolate_host`, cast to the model dtype), so both scripts
feed the same vectors for the same pair.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from absl import flags

import plateau_jax as pj
from experiments import common
from plateau_jax import files
from plateau_jax.jacobians import sweep as jacobians
from plateau_jax.model import sites
from plateau_jax.plateaus import interpolation
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import paths
from plateau_jax.plateaus import prompts
from plateau_jax.plotting import jacobians as plotting

FLAGS = flags.FLAGS

common.define_model_flags()

flags.DEFINE_string("context", "The house was", "Shared context (no BOS token).")
flags.DEFINE_string("pairs", "big:in,big:large", "Ending pairs 'A:B,...' (one token each).")
flags.DEFINE_integer("layer", 0, "Interpolate at blocks.{layer}.hook_{site}.")
flags.DEFINE_enum("site", "resid_post", ["resid_post", "resid_pre"], "Interpolated residual site.")
flags.DEFINE_integer("steps", 50, "Steps of alpha = linspace(0, 1, steps).")
flags.DEFINE_enum("path", "slerp", list(paths.PATHS), "Interpolation path.")
flags.DEFINE_list("families", list(jacobians.FAMILIES), "Per-layer Jacobian families.")
flags.DEFINE_list("stats", ["fro"], f"Reductions among {jacobians.STATS}.")
flags.DEFINE_integer("top_k", 0, "Singular values kept for stats=topk.")
flags.DEFINE_enum("spec_method", "svd", list(jacobians.SPEC_METHODS),
                  "Spectral norm: exact from the dense matrix, or matrix-free power iteration.")
flags.DEFINE_enum("mlp_method", "gram", list(jacobians.MLP_METHODS),
                  "MLP Jacobian: closed form, autodiff, or exact Gram Frobenius norms.")
flags.DEFINE_bool("products", True, "Also the study's skip-free products of MLP/attention Jacobians.")
flags.DEFINE_bool("cumulative", True, "Also end-to-end cumulative Jacobians at every depth.")
flags.DEFINE_list("full", [], f"Return full matrices for these names ({jacobians.FULL_NAMES}).")
flags.DEFINE_bool("force_full", False, "Keep full matrices even above the size limit.")
flags.DEFINE_integer("batch_size", 8, "Steps per vectorised chunk (lower for big models).")
flags.DEFINE_integer("power_iters", 30, "Power-iteration steps (spec_method=power).")
flags.DEFINE_integer("probes", 16, "Hutchinson probes (stats=fro_hutch).")
flags.DEFINE_integer("seed", 0, "Seed for matrix-free estimates.")
flags.DEFINE_bool("overlay", True, "Overlay relative-distance curves r(alpha) on the figures.")
flags.DEFINE_bool("figures", True, "Write figures.")
flags.DEFINE_enum("figure_format", "png", ["png", "pdf", "svg"], "Figure file format.")

InputError = common.InputError


def pair_endpoints(model, pairs):
    """``[P, 2, d]`` endpoints at ``blocks.{--layer}.hook_{--site}`` (one prefix, one call), as
    ``experiments.plateaus`` computes them."""
    prefix = pj.run_prefix(model, pairs[0].context_ids)
    tokens = np.array([[p.token_a, p.token_b] for p in pairs], np.int32)
    ends = interpolation.endpoint_activations(model, prefix, tokens.ravel(), [FLAGS.layer],
                                              FLAGS.site)
    ends = np.asarray(ends[0], np.float32).reshape(len(pairs), 2, -1)
    interpolation.check_endpoints_finite(ends[:, 0], ends[:, 1],
                                         sites.site_name(FLAGS.layer, FLAGS.site), model.dtype)
    return prefix, ends


def run_pair(model, prefix, a, b, opts: jacobians.SweepOptions, grams=None):
    """Returns ({name: array} for the npz, seconds of the jitted sweep)."""
    cfg = model.config
    alpha = paths.alpha_grid(FLAGS.steps)
    # float64 on the host, then the model dtype: the same vectors as experiments.plateaus feeds.
    x = paths.interpolate_host(a, b, alpha, FLAGS.path, dtype=model.dtype)
    layers = jacobians.sweep_layers(cfg, FLAGS.layer, FLAGS.site)
    t = time.perf_counter()
    out = jacobians.jacobian_sweep(model, prefix, x, FLAGS.layer, FLAGS.site, options=opts,
                                   grams=grams, seed=FLAGS.seed, force=FLAGS.force_full)
    out = {k: np.asarray(v) for k, v in out.items()}
    secs = time.perf_counter() - t
    res = dict(alpha=alpha, layers=layers, x=np.asarray(x, np.float32), **out)
    if FLAGS.overlay:
        rsites = [sites.site_name(l, "resid_post") for l in layers]
        logits, rec = pj.continue_from(model, prefix, x, FLAGS.layer, site=FLAGS.site, sites=rsites)
        res["r_logits"] = metrics.relative_distance(np.asarray(logits, np.float64))
        res["r_resid_post"] = metrics.relative_distance(np.stack([np.asarray(rec[s]) for s in rsites]))
    return res, secs


def check_layer(n_layer: int) -> None:
    """--layer must leave at least one later layer (the rows of every Jacobian family)."""
    last = n_layer - 1 - sites.first_layer_after(0, FLAGS.site)  # the last layer with a later one
    if not 0 <= FLAGS.layer <= last:
        raise InputError(
            f"--layer={FLAGS.layer} with --site={FLAGS.site}: this model has layers "
            f"0..{n_layer - 1}, and the Jacobians need a layer after the interpolated site, so "
            f"--layer must be in 0..{last}"
            + (" (or use --site=resid_pre)." if FLAGS.site == "resid_post" else "."))


def options_from_flags() -> jacobians.SweepOptions:
    common.subset("families", FLAGS.families, jacobians.FAMILIES)
    common.subset("stats", FLAGS.stats, jacobians.STATS)
    common.subset("full", FLAGS.full, jacobians.FULL_NAMES, nonempty=False)
    for name in ("steps",):
        common.positive(name, getattr(FLAGS, name), 2)
    for name in ("batch_size", "power_iters", "probes"):
        common.positive(name, getattr(FLAGS, name), 1)
    try:
        return jacobians.SweepOptions(
            families=tuple(FLAGS.families), stats=tuple(FLAGS.stats), top_k=FLAGS.top_k,
            spec_method=FLAGS.spec_method, mlp_method=FLAGS.mlp_method, products=FLAGS.products,
            cumulative=FLAGS.cumulative, full=tuple(FLAGS.full), batch_size=FLAGS.batch_size,
            power_iters=FLAGS.power_iters, probes=FLAGS.probes)
    except ValueError as e:
        raise InputError(f"Jacobian options: {e}") from None


@common.cli
def main(argv):
    del argv
    # Everything that can be checked without the model, before loading it.
    opts = options_from_flags()
    pair_specs = prompts.parse_pairs(FLAGS.pairs)
    common.check_layer_early(check_layer)

    def check_model(model):
        check_layer(model.config.n_layer)
        jacobians.check_full_size(model.config, FLAGS.steps, FLAGS.layer, FLAGS.site, opts.full,
                                  np.dtype(model.dtype).itemsize, force=FLAGS.force_full)

    pub = common.open_publication("jacobians", __name__)
    model, pairs, _ = common.load_model_and_prompts(pub, pair_specs, check_model)
    with pub.staging() as stage:
        prefix, ends = pair_endpoints(model, pairs)
        grams = None
        if opts.gram_fro("mlp") and len(pairs) > 1:
            t = time.perf_counter()
            grams = jacobians.mlp_grams_for(model)
            logging.info("MLP Gram matrices (shared by %d pairs): %.2fs", len(pairs),
                         time.perf_counter() - t)
        for i, pair in enumerate(files.progress(pairs, desc="pairs")):
            res, secs = run_pair(model, prefix, ends[i, 0], ends[i, 1], opts, grams)
            files.fault_point("compute")
            label = pair.label.replace("->", "-").replace("/", "_")
            path = os.path.join(stage, f"jacobians_{label}.npz")
            files.atomic_save_npz(path, sweep_seconds=np.float64(secs), **res)
            logging.info("%s: sweep %.2fs", label, secs)
            files.fault_point("write")
            if FLAGS.figures:
                for f in plotting.save_all(res, stage, label=label, model_name=model.name,
                                           endings=(pair.ending_a, pair.ending_b),
                                           where=pj.site_name(FLAGS.layer, FLAGS.site),
                                           fmt=FLAGS.figure_format):
                    logging.info("figure %s", os.path.basename(f))
        out = pub.commit(extra=common.model_record(model))
    print(f"published: {out}")


if __name__ == "__main__":
    common.run(main)
