r"""Emergence of plateaus during training: sharpness S, the boundary alpha* and MLP-Jacobian-peak /
boundary alignment at each checkpoint of a training run (initialisation included).

    # revisions of one hub model (Pythia's 154 training checkpoints are branches step0 ... step143000)
    python -m experiments.emergence --model=EleutherAI/pythia-160m \
        --revisions=step0,step512,step1000,step8000,step36000,step143000 --output_dir=runs/pythia
    # the project's own training run, or any local checkpoint directories
    python -m experiments.emergence --run_dir=runs/tiny-plateau --output_dir=runs/emergence
    python -m experiments.emergence --checkpoints=ckpt/step_0,ckpt/step_500 --output_dir=runs/e

For every checkpoint (each revision of --model, each ``run_dir/checkpoints/step_*``, or each
directory of --checkpoints; the training step is read from the trailing number of its name) and
every prompt pair (each context of --contexts with each pair of --pairs):

1. a, b = ``blocks.{layer}.hook_resid_post`` at the last position of context + ending A / B;
2. x(alpha) = path(a, b, alpha) on ``alpha = linspace(0, 1, n_steps)`` (slerp with norm
   rescaling by default), fed in at the last position with :func:`plateau_jax.continue_from`;
3. r(alpha) = |y - y0| / (|y - y0| + |y - y1|) of the logits y, sharpness
   S = max_k (r_{k+1} - r_k) / (alpha_{k+1} - alpha_k) (1 for a straight line), and the
   boundary alpha* = midpoint of the step where r jumps most;
4. for each later layer i, the Frobenius norm of the MLP Jacobian d mlp_out / d resid_mid
   (ln_2 included; resid_pre with a parallel residual) at the recorded input; its peak alpha and the
   distance |alpha_peak - alpha*| (alignment: 0 = the Jacobian peaks at the boundary), and the
   peak's contrast max / median over alpha.

Publishes ``results.json`` (every curve and number), ``summary.json`` (per-checkpoint medians
and IQRs over pairs of S, alpha* and the peak offsets), ``emergence.png`` (S and alpha* medians
and IQRs against the training step, the peak offsets, one pair's curves at every step) and
``config.json`` together in ``--output_dir/emergence/`` (staged, then one atomic switch).

Metrics come from :mod:`plateau_jax.plateaus.metrics` (relative distance, sharpness,
boundary) and the MLP Jacobian norms from the exact Gram path of :mod:`plateau_jax.jacobians.mlp`.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import numpy as np
from absl import flags

from experiments import common
from plateau_jax.plateaus import metrics
from plateau_jax.plotting import emergence as plotting

FLAGS = flags.FLAGS

def define_flags():
    """Defines this script's flags (called by ``__main__`` only, so that importing the
    module from tests or other scripts defines no flags)."""
    flags.DEFINE_string("model", None, "Hub id or local directory whose --revisions to analyse.")
    flags.DEFINE_list("revisions", None, "Revisions (branches, tags) of --model, e.g. "
                      "step0,step512,step143000; the step is the trailing number of each name.")
    flags.DEFINE_string("cache_dir", None, "Hugging Face hub cache for --model (default: HF's).")
    flags.DEFINE_string("run_dir", None, "A training run directory (experiments.train output).")
    flags.DEFINE_list("checkpoints", None, "Checkpoint directories (instead of --run_dir).")
    flags.DEFINE_string("output_dir", None, "Where results.json, summary.json and the figure go.")
    flags.DEFINE_list("contexts", ["The house was", "The man was", "The water was", "The dog was"],
                      "Shared contexts.")
    flags.DEFINE_string("pairs", "big:in,big:large,big:small,old:new,in:on,full:made,red:tall,"
                        "cold:dark,open:closed", "Ending pairs A:B (each one token after the context).")
    flags.DEFINE_integer("layer", 0, "Interpolate resid_post of this layer.")
    flags.DEFINE_integer("n_steps", 50, "Points on the path (alpha = linspace(0, 1, n_steps)).")
    flags.DEFINE_enum("path", "slerp", ["slerp", "linear"], "Interpolation path.")
    flags.DEFINE_enum("dtype", "float32", ["float32"], "Compute dtype.")
    common.define_overwrite_flag()
    common.define_runtime_flags()


# ----------------------------------------------------------------------------- metric helpers

_JITTED = {}


def mlp_jacobian_norms(model, layer: int, resid_mid) -> np.ndarray:
    """Exact Frobenius norms of d mlp_out / d resid_mid (ln_2 included; resid_pre with a parallel
    residual) of ``layer`` at each row of ``resid_mid`` ``[n, d]``, via the library's
    Gram-matrix path (compiled once per model shape)."""
    import jax
    import jax.numpy as jnp

    from plateau_jax.jacobians.mlp import mlp_frobenius_gram
    if "f" not in _JITTED:
        _JITTED["f"] = jax.jit(mlp_frobenius_gram, static_argnums=(1,))
    blk = model.block(layer)
    return np.asarray(_JITTED["f"](blk, model.config, jnp.asarray(resid_mid, model.dtype)))


# ----------------------------------------------------------------------------- one pair

def analyse_pair(model, pair, layer: int, alpha, path: str) -> dict:
    """Every number of the study for one prompt pair on one checkpoint (see module doc)."""
    import plateau_jax
    from plateau_jax.plateaus import interpolation, paths
    from plateau_jax.model.sites import first_layer_after, mlp_input, site_name as site

    cfg = model.config
    mlp_in = mlp_input(cfg)  # resid_mid, or resid_pre with a parallel residual
    prefix = plateau_jax.run_prefix(model, pair.context_ids)
    ab = interpolation.endpoint_activations(model, prefix, [pair.token_a, pair.token_b],
                                            [layer])[0]
    xs = paths.interpolate_host(ab[0], ab[1], alpha, path, dtype=model.dtype)  # float64, cast
    later = list(range(first_layer_after(layer, "resid_post"), cfg.n_layer))
    logits, rec = plateau_jax.continue_from(model, prefix, xs, layer=layer,
                                            sites=[site(i, mlp_in) for i in later])
    logits = np.asarray(logits)
    r = metrics.relative_distance(np.asarray(logits, np.float64))
    s = float(metrics.sharpness(r, alpha))
    a_star = float(metrics.boundary(r, alpha))
    jac = {}
    for i in later:
        norms = mlp_jacobian_norms(model, i, rec[site(i, mlp_in)])
        peak = float(alpha[int(metrics.peak(norms)[0])])
        jac[i] = dict(norms=norms.tolist(), peak_alpha=peak, peak_offset=abs(peak - a_star),
                      contrast=float(norms.max() / np.median(norms)))
    p_a, p_b = np.exp(metrics.log_softmax(logits[[0, -1]]))
    return dict(label=f"{pair.context} |{pair.ending_a.strip()}->{pair.ending_b.strip()}",
                context=pair.context, ending_a=pair.ending_a, ending_b=pair.ending_b,
                r=r.tolist(), S=s, boundary_alpha=a_star,
                endpoint_logit_distance=float(np.linalg.norm(logits[-1] - logits[0])),
                endpoint_tv=float(0.5 * np.abs(p_a - p_b).sum()),
                jacobian=jac,
                mean_peak_offset=float(np.mean([v["peak_offset"] for v in jac.values()])) if jac else None,
                deepest_peak_offset=jac[later[-1]]["peak_offset"] if jac else None,
                mean_contrast=float(np.mean([v["contrast"] for v in jac.values()])) if jac else None)


# ----------------------------------------------------------------------------- driver

def find_checkpoints(run_dir: str):
    """[(step, directory)] of ``run_dir/checkpoints/step_*``, sorted by step."""
    out = []
    for d in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        m = re.search(r"step_(\d+)$", d)
        if m and os.path.exists(os.path.join(d, "config.json")):
            out.append((int(m.group(1)), d))
    if not out:
        raise FileNotFoundError(f"No checkpoints under {run_dir}/checkpoints/step_*; run "
                                "`python -m experiments.train --output_dir=...` first.")
    return sorted(out)


def step_of(name: str) -> int:
    """The training step a revision or directory name ends with: ``step1000`` -> 1000."""
    m = re.search(r"(\d+)$", name.rstrip("/"))
    if not m:
        raise ValueError(f"cannot read a training step from {name!r}: name revisions and "
                         "checkpoints with a trailing step number (e.g. step1000).")
    return int(m.group(1))


def revision_checkpoints(model: str, revisions):
    """[(step, model, revision)] of ``model``'s revisions, sorted by step."""
    return sorted((step_of(r), model, r) for r in revisions)


def _quartiles(v):
    v = np.asarray([x for x in v if x is not None], np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), mean=float(v.mean()), n=int(v.size))


def run(checkpoints, contexts, pair_spec: str, layer=0, n_steps=50, path="slerp",
        heldout_loss=None, cache_dir=None, precision: str = "highest") -> dict:
    """Analyses every checkpoint, ``(step, directory)`` or ``(step, hub id or directory,
    revision)``; returns {"checkpoints": [...], "summary": [...]}. Every checkpoint runs the same
    prompt pairs."""
    import plateau_jax
    from plateau_jax import files
    from plateau_jax.plateaus import paths
    from plateau_jax.plateaus import prompts

    alpha = paths.alpha_grid(n_steps)
    pairs_raw = prompts.parse_pairs(pair_spec)
    results, summary = [], []
    for step, source, *rev in files.progress(checkpoints, "checkpoints"):
        revision = rev[0] if rev else None
        model = plateau_jax.load_model(source, revision=revision, cache_dir=cache_dir,
                                       matmul_precision=precision)
        pairs = [prompts.encode_pair(model.tokenizer, c, a, b, model.config.n_positions)
                 for c in contexts for a, b in pairs_raw]
        per_pair = [analyse_pair(model, p, layer, alpha, path) for p in pairs]
        results.append(dict(step=step, directory=source, revision=revision, pairs=per_pair))
        row = dict(step=step, revision=revision,
                   S=_quartiles([p["S"] for p in per_pair]),
                   boundary_alpha=_quartiles([p["boundary_alpha"] for p in per_pair]),
                   mean_peak_offset=_quartiles([p["mean_peak_offset"] for p in per_pair]),
                   deepest_peak_offset=_quartiles([p["deepest_peak_offset"] for p in per_pair]),
                   mean_contrast=_quartiles([p["mean_contrast"] for p in per_pair]),
                   endpoint_tv=_quartiles([p["endpoint_tv"] for p in per_pair]))
        if heldout_loss and step in heldout_loss:
            row["heldout_loss"] = heldout_loss[step]
        summary.append(row)
        logging.info("step %d: S median %.2f [%.2f, %.2f]; alpha* median %.3f; |peak - boundary| "
                     "median %.3f", step, row["S"]["median"], row["S"]["q1"], row["S"]["q3"],
                     row["boundary_alpha"]["median"], row["mean_peak_offset"]["median"])
    return dict(alpha=alpha.tolist(), layer=layer, path=path, checkpoints=results, summary=summary)


def random_baseline_offset(n_later_layers: int, n_steps: int, seed=0, trials=20000) -> float:
    """Expected |alpha_peak - alpha*| when peaks fall uniformly on the grid (a chance level)."""
    rng = np.random.default_rng(seed)
    alpha = np.linspace(0, 1, n_steps)
    b = 0.5 * (alpha[:-1] + alpha[1:])
    return float(np.mean(np.abs(rng.choice(alpha, trials) - rng.choice(b, trials))))


def model_name(checkpoints) -> str:
    """What the figure calls the model: --model, the run directory, or the checkpoints' parent."""
    if FLAGS.model:
        return FLAGS.model
    source = FLAGS.run_dir or os.path.dirname(os.path.normpath(checkpoints[0][1]))
    return os.path.basename(os.path.normpath(source)) or source


@common.cli
def main(argv):
    del argv
    import json

    from plateau_jax.plateaus import paths
    from plateau_jax.plateaus import prompts

    if not FLAGS.output_dir:
        raise common.InputError("--output_dir is required.")
    modes = [bool(FLAGS.model or FLAGS.revisions), bool(FLAGS.checkpoints), bool(FLAGS.run_dir)]
    if sum(modes) != 1:
        raise common.InputError("give exactly one of --model with --revisions (hub revisions), "
                                "--checkpoints (directories) or --run_dir (a training run).")
    if FLAGS.model or FLAGS.revisions:
        if not (FLAGS.model and FLAGS.revisions):
            raise common.InputError("--model and --revisions go together.")
        try:
            ckpts = revision_checkpoints(FLAGS.model, FLAGS.revisions)
        except ValueError as e:
            raise common.InputError(f"--revisions: {e}")
    elif FLAGS.checkpoints:
        ckpts = []
        for d in FLAGS.checkpoints:
            common.existing_dir("checkpoints", d)
            m = re.search(r"(\d+)$", d.rstrip("/"))
            ckpts.append((int(m.group(1)) if m else len(ckpts), d))
    else:
        common.existing_dir("run_dir", FLAGS.run_dir)
        ckpts = find_checkpoints(FLAGS.run_dir)
    paths.alpha_grid(FLAGS.n_steps)
    prompts.parse_pairs(FLAGS.pairs)
    if not FLAGS.contexts or any(not c.strip() for c in FLAGS.contexts):
        raise common.InputError("--contexts: give non-empty contexts.")
    n_layer = common.peek_n_layer(ckpts[0][1])
    if FLAGS.layer < 0 or (n_layer is not None and FLAGS.layer >= n_layer - 1):
        raise common.InputError(f"--layer={FLAGS.layer}: needs a later layer; use 0.."
                                f"{'n_layer-2' if n_layer is None else n_layer - 2}.")
    heldout = {}
    if FLAGS.run_dir and os.path.exists(os.path.join(FLAGS.run_dir, "metrics.jsonl")):
        with open(os.path.join(FLAGS.run_dir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                for k in ("heldout_loss", "heldout_loss_quick"):
                    if k in rec:
                        heldout[rec["step"]] = rec[k]
    from plateau_jax import files

    config = {f: getattr(FLAGS, f) for f in ("model", "revisions", "cache_dir", "run_dir",
                                             "checkpoints", "contexts", "pairs", "layer",
                                             "n_steps", "path", "matmul_precision")}
    pub = files.Publication(FLAGS.output_dir, "emergence", config, overwrite=FLAGS.overwrite)
    with pub.staging() as stage:
        common.apply_runtime_flags()
        res = run(ckpts, FLAGS.contexts, FLAGS.pairs, FLAGS.layer, FLAGS.n_steps, FLAGS.path,
                  heldout, cache_dir=FLAGS.cache_dir, precision=FLAGS.matmul_precision)
        n_later = len(res["checkpoints"][0]["pairs"][0]["jacobian"])
        res["chance_peak_offset"] = random_baseline_offset(n_later, FLAGS.n_steps)
        files.atomic_write_json(os.path.join(stage, "results.json"), res)
        files.atomic_write_json(os.path.join(stage, "summary.json"),
                                dict(summary=res["summary"],
                                     chance_peak_offset=res["chance_peak_offset"]))
        plotting.save_all(res, stage, model_name=model_name(ckpts))
        out = pub.commit()
    logging.info("Published %s", out)


if __name__ == "__main__":
    define_flags()
    common.run(main)
