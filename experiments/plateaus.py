"""Activation plateaus: interpolate between two prompts at every layer, freeze, measure, plot.

Reproduces every figure of the study in one command (see the README)::

    python -m experiments.plateaus --flagfile=experiments/flags/study.flags --output_dir=runs/study
    python -m experiments.plateaus --model=gpt2 --pairs=big:in --steps=30 --output_dir=runs/small

Publishes ``config.json`` (resolved flags, versions, devices), ``results.npz`` and the figures
together in ``--output_dir/plateaus/`` (staged, then one atomic switch; see the README).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import numpy as np
from absl import flags

import plateau_jax
from experiments import common
from plateau_jax import files
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import interpolation
from plateau_jax.plotting import plateaus as plotting
from plateau_jax.plateaus import prompts
from plateau_jax.plateaus.paths import PATHS, alpha_grid
from plateau_jax.model import sites
from plateau_jax.model.sites import RESIDUAL_SITES

FLAGS = flags.FLAGS
common.define_model_flags()
flags.DEFINE_string("context", "The house was", "Shared context (no BOS token is added).")
flags.DEFINE_string("pairs", "big:in,big:large",
                    "Ending pairs A:B, comma-separated; each ending is joined to the context with "
                    "one space and must be exactly one token.")
flags.DEFINE_integer("steps", 50, "Number of alpha steps, linspace(0, 1, steps) (>= 2).")
flags.DEFINE_list("alphas", [], "Explicit alpha grid (overrides --steps): increasing, 0 ... 1.")
flags.DEFINE_integer("layer", 0, "Interpolation layer for the per-layer, freezing, step-size and "
                     "spline figures.")
flags.DEFINE_string("interp_layers", "all",
                    "Interpolation layers for the 'each layer' and 'N layers downstream' figures: "
                    "'all' or a comma list such as 0,4,8.")
flags.DEFINE_enum("site", "resid_post", list(RESIDUAL_SITES), "Residual site interpolated.")
flags.DEFINE_enum("path", "slerp", list(PATHS), "Interpolation path.")
flags.DEFINE_enum("freeze_mode", "mean", list(interpolation.FREEZE_MODES),
                  "Frozen value: mean over steps (the study), endpoint A's value, or the straight "
                  "line between the endpoints' values.")
flags.DEFINE_string("freeze_layers", "all",
                    "Layers whose attn_out/mlp_out are frozen: 'all' (every layer after --layer) "
                    "or a comma list.")
flags.DEFINE_list("distances", ["1", "4", "8", "16", "24"],
                  "N layers between interpolation and recording, clipped to the model's depth.")
flags.DEFINE_bool("save_activations", False,
                  "Also store every recorded activation and the logits of the --layer run "
                  "(large: about 110 MB per pair for GPT-2 Large).")
flags.DEFINE_enum("figure_format", "png", ["png", "pdf", "svg"], "Figure file format.")

FREEZE_CONDITIONS = ("none", "attn", "mlp")


InputError = common.InputError


def parse_layers(spec: str, n_layer: int, what: str, allowed: Sequence[int] = None) -> List[int]:
    """'all' -> ``allowed`` (default 0..n_layer-1); '0,4,8' -> [0, 4, 8], range-checked."""
    allowed = list(range(n_layer)) if allowed is None else list(allowed)
    if spec.strip() == "all":
        return allowed
    try:
        layers = sorted({int(t) for t in spec.split(",") if t.strip()})
    except ValueError:
        raise InputError(f"--{what}={spec!r}: expected 'all' or comma-separated layer numbers.")
    bad = [l for l in layers if l not in allowed]
    if bad or not layers:
        span = f"{allowed[0]}..{allowed[-1]}" if allowed else "none"
        raise InputError(f"--{what}={spec!r}: layers {bad or '(none)'} out of range; "
                         f"allowed: {span}.")
    return layers


def parse_alpha() -> np.ndarray:
    if FLAGS.alphas:
        try:
            return interpolation.check_alpha([float(a) for a in FLAGS.alphas])
        except ValueError as e:
            raise InputError(f"--alphas: {e}")
    try:
        return alpha_grid(FLAGS.steps)
    except ValueError as e:
        raise InputError(f"--steps: {e}")


def parse_distances(n_layer: int, site: str) -> List[int]:
    """--distances as ints, each clipped to the deepest reachable N, deduplicated."""
    try:
        dists = [int(d) for d in FLAGS.distances]
    except ValueError:
        raise InputError(f"--distances={','.join(FLAGS.distances)}: expected positive integers.")
    if not dists or any(d < 1 for d in dists):
        raise InputError(f"--distances={','.join(FLAGS.distances)}: expected positive integers.")
    deepest = n_layer - sites.first_layer_after(0, site)
    return sorted({min(d, deepest) for d in dists if deepest >= 1})


def check_layer_flags(n_layer: int):
    """--layer, --interp_layers, --freeze_layers, --distances against a model of ``n_layer``
    layers; returns (interp_layers, freeze_layers, distances)."""
    common.check_layer_flag(n_layer)
    first = sites.first_layer_after(FLAGS.layer, FLAGS.site)
    if first >= n_layer:
        raise InputError(
            f"--layer={FLAGS.layer} with --site={FLAGS.site} leaves no later layer to record, "
            "freeze or measure (the per-layer, freezing, step-size and spline results need one): "
            f"use --layer<={n_layer - 2}, or --site=resid_pre/resid_mid to include layer "
            f"{FLAGS.layer}.")
    interp_layers = parse_layers(FLAGS.interp_layers, n_layer, "interp_layers")
    freeze_layers = parse_layers(FLAGS.freeze_layers, n_layer, "freeze_layers",
                                 allowed=range(first, n_layer))
    return interp_layers, freeze_layers, parse_distances(n_layer, FLAGS.site)


def _pad(arr, layers: Sequence[int], n_layer: int, axis: int = 1):
    """Places ``arr`` (``len(layers)`` along ``axis``) into an array of ``n_layer`` NaN rows."""
    arr = np.asarray(arr, np.float64)
    shape = list(arr.shape)
    shape[axis] = n_layer
    out = np.full(shape, np.nan)
    idx = [slice(None)] * arr.ndim
    idx[axis] = list(layers)
    out[tuple(idx)] = arr
    return out


class _Study:
    """What every part of the study shares: the model, the context's cache (run once), the
    pairs' tokens and their endpoints at every needed interpolation layer (one call)."""

    def __init__(self, model, pairs: Sequence[prompts.PromptPair], alpha: np.ndarray,
                 layers: Sequence[int], site: str, path: str):
        self.model, self.alpha, self.site, self.path = model, alpha, site, path
        self.n_layer = model.config.n_layer
        self.prefix = plateau_jax.run_prefix(model, pairs[0].context_ids)
        self.tokens = np.array([[p.token_a, p.token_b] for p in pairs], np.int32)  # [P, 2]
        need = sorted(set(layers))
        ends = interpolation.endpoint_activations(model, self.prefix, self.tokens.ravel(), need,
                                                  site)
        ends = np.asarray(ends, np.float32)
        self.ends = dict(zip(need, ends.reshape(len(need), len(pairs), 2, -1)))  # l -> [P, 2, d]

    def run(self, layer: int, **kw) -> interpolation.InterpolationRun:
        """One batched interpolation run of every pair at ``layer``."""
        a, b = self.ends[layer][:, 0], self.ends[layer][:, 1]
        return interpolation.interpolation_run(self.model, self.prefix, a, b, layer, self.alpha,
                                               path=self.path, site=self.site, **kw)

    def pad(self, arr, layers: Sequence[int]):
        return _pad(arr, layers, self.n_layer)


def _main_run(study: _Study, layer: int, save_activations: bool):
    """The run at --layer (every component of every later layer) and its metrics: relative
    distances, KL, step sizes, spline Hamming counts and densities, sharpness and boundaries."""
    main = study.run(layer)
    down, alpha, pad = main.layers, study.alpha, study.pad
    acts = {c: np.asarray(v, np.float32) for c, v in main.acts.items()}
    logits = np.asarray(main.logits, np.float32)
    res = {"x": np.asarray(main.x, np.float32),  # the vectors fed in (model dtype, widened)
           "downstream_layers": np.array(down, np.int32)}
    for c in interpolation.default_components(study.model.config):
        res[f"r_{c}"] = pad(metrics.relative_distance(acts[c]), down)
    res["r_logits"] = metrics.relative_distance(logits)
    res["kl_logits"] = metrics.kl_to_endpoints(logits)
    res["step_resid_post"] = pad(metrics.step_sizes(acts["resid_post"]), down)
    res["step_logits"] = metrics.step_sizes(logits)
    res["spline_hamming"] = pad(metrics.spline_hamming(acts["mlp_pre"]), down)
    mlp_in = acts[sites.mlp_input(study.model.config)]  # resid_pre if parallel
    res["spline_density"] = pad(metrics.spline_density(acts["mlp_pre"], mlp_in), down)
    # Sharpness on the relative distance r (the study's curves) and on the distance curve
    # d(alpha)/d(1) (the stable-regions work's); two different numbers, named apart.
    d_resid = pad(metrics.distance_curve(acts["resid_post"]), down)
    d_logits = metrics.distance_curve(logits)
    for target, r, d in (("resid_post", res["r_resid_post"], d_resid),
                         ("logits", res["r_logits"], d_logits)):
        res[f"sharpness_r_{target}"] = metrics.sharpness(r, alpha)
        res[f"sharpness_d_{target}"] = metrics.sharpness(d, alpha)
        res[f"boundary_{target}"] = metrics.boundary(r, alpha)
    if save_activations:
        res.update({f"acts_{c}": v for c, v in acts.items()})
        res["logits"] = logits
    return main, res


def _freezing(study: _Study, main, clean: Dict[str, np.ndarray], freeze_mode: str,
              freeze_layers: Sequence[int]):
    """Reruns of the main run with attn_out, then mlp_out, of ``freeze_layers`` frozen; the
    clean relative distances (``clean``: the main run's results) come first."""
    frozen_r_logits, frozen_r_resid = [clean["r_logits"]], [clean["r_resid_post"]]
    for sublayer in files.progress(FREEZE_CONDITIONS[1:], desc="freezing"):
        fr = study.run(main.layer, components=("resid_post",),
                       patches=interpolation.freeze_patches(main, sublayer, freeze_mode,
                                                            freeze_layers))
        frozen_r_logits.append(metrics.relative_distance(fr.logits))
        frozen_r_resid.append(study.pad(metrics.relative_distance(fr.acts["resid_post"]),
                                        main.layers))
    frozen_r_logits = np.stack(frozen_r_logits, axis=1)  # [P, 3, n]
    return {"freeze_conditions": np.array(FREEZE_CONDITIONS),
            "freeze_layers": np.array(freeze_layers, np.int32),
            "frozen_r_logits": frozen_r_logits,
            "frozen_r_resid_post": np.stack(frozen_r_resid, axis=1),  # [P, 3, n_layer, n]
            "frozen_sharpness_r_logits": metrics.sharpness(frozen_r_logits, study.alpha)}


def _each_interpolation_layer(study: _Study, main, interp_layers: Sequence[int],
                              distances: Sequence[int]):
    """For every interpolation layer: r of the logits, and r of resid_post N layers downstream
    for each N of ``distances`` (the main run serves its own layer)."""
    P, n = study.tokens.shape[0], study.alpha.size
    each_r = np.full((P, len(interp_layers), n), np.nan)
    dist_r = np.full((P, len(distances), len(interp_layers), n), np.nan)
    for i, l in enumerate(files.progress(interp_layers, desc="interpolation layers")):
        first = sites.first_layer_after(l, study.site)
        rec = {j: first + d - 1 for j, d in enumerate(distances) if first + d - 1 < study.n_layer}
        run = main if l == main.layer else study.run(l, components=("resid_post",),
                                                     layers=sorted(set(rec.values())))
        each_r[:, i] = metrics.relative_distance(run.logits)
        for j, rl in rec.items():
            dist_r[:, j, i] = metrics.relative_distance(run.act("resid_post", rl))
    return {"interp_layers": np.array(interp_layers, np.int32),
            "distances": np.array(distances, np.int32),
            "each_r_logits": each_r,
            "each_sharpness_r_logits": metrics.sharpness(each_r, study.alpha),
            "each_boundary_logits": metrics.boundary(each_r, study.alpha),
            "dist_r_resid_post": dist_r}


def run_study(model: plateau_jax.Model, pairs: Sequence[prompts.PromptPair], alpha: np.ndarray, *,
              layer: int, interp_layers: Sequence[int], site: str, path: str, freeze_mode: str,
              freeze_layers: Sequence[int], distances: Sequence[int],
              save_activations: bool = False) -> Dict[str, np.ndarray]:
    """Every computation of the study; returns the results arrays (see the README).

    The shared context runs once; endpoints of all needed layers come from one call; each
    interpolation layer is one batched continuation over all pairs and steps. Parts: the main
    run at ``layer`` and its metrics (:func:`_main_run`), freezing (:func:`_freezing`), and
    every interpolation layer (:func:`_each_interpolation_layer`).
    """
    study = _Study(model, pairs, alpha, list(interp_layers) + [layer], site, path)
    res: Dict[str, np.ndarray] = {
        "alpha": alpha, "tokens": study.tokens, "context_ids": pairs[0].context_ids,
        "endings": np.array([[p.ending_a, p.ending_b] for p in pairs]),
        "pair_labels": np.array([p.label for p in pairs]), "layer": np.array(layer),
        "endpoints": study.ends[layer]}
    main, main_res = _main_run(study, layer, save_activations)
    res.update(main_res)
    files.fault_point("compute")
    res.update(_freezing(study, main, main_res, freeze_mode, freeze_layers))
    res.update(_each_interpolation_layer(study, main, interp_layers, distances))
    return res


@common.cli
def main(argv):
    del argv
    # Everything that can be checked without the model, before loading it.
    alpha = parse_alpha()
    pair_specs = prompts.parse_pairs(FLAGS.pairs)
    parse_distances(1, FLAGS.site)
    common.check_layer_early(check_layer_flags)
    pub = common.open_publication("plateaus", __name__)
    model, pairs, (interp_layers, freeze_layers, distances) = common.load_model_and_prompts(
        pub, pair_specs, lambda m: check_layer_flags(m.config.n_layer))
    with pub.staging() as stage:
        res = run_study(model, pairs, alpha, layer=FLAGS.layer, interp_layers=interp_layers,
                        site=FLAGS.site, path=FLAGS.path, freeze_mode=FLAGS.freeze_mode,
                        freeze_layers=freeze_layers, distances=distances,
                        save_activations=FLAGS.save_activations)
        res.update(model_name=np.array(model.name), context=np.array(FLAGS.context),
                   site=np.array(FLAGS.site), interp_path=np.array(FLAGS.path),
                   freeze_mode=np.array(FLAGS.freeze_mode))
        files.atomic_save_npz(os.path.join(stage, "results.npz"), **res)
        files.fault_point("write")
        figs = plotting.save_all(plotting.load_results(os.path.join(stage, "results.npz")), stage,
                                 FLAGS.figure_format)
        out = pub.commit(extra=common.model_record(model))
    results_path = os.path.join(out, "results.npz")
    logging.info("Published %s and %d figures in %s", results_path, len(figs), out)
    print(f"results: {results_path}\nfigures: {', '.join(os.path.basename(f) for f in figs)}")


if __name__ == "__main__":
    common.run(main)
