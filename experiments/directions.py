"""Direction baselines, sensitive directions and steering: how far must an activation move, and
in which direction, before the model's output changes?

For ``--n_base`` prompts (base points: the last position's ``blocks.{layer}.hook_{site}``), every
direction type of :mod:`plateau_jax.plateaus.directions` and every step length (units of D, the
median distance between real activations at the site) run through the rest of the model in one
batched computation. Writes ``config.json``, ``reference.npz`` (+ ``reference_activations.npy``),
``results.npz`` (docs/directions.md lists every array), ``summary.md`` and the figures::

    python -m experiments.directions --output_dir=runs/directions            # shipped model
    python -m experiments.directions --flagfile=experiments/flags/directions_gpt2_small.flags \\
        --output_dir=runs/directions_gpt2
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common
from experiments import perturb_common as pc
from plateau_jax import files
from plateau_jax.plateaus import directions as D
from plateau_jax.plateaus import reference as reference_lib
from plateau_jax.plotting import directions as plotting

FLAGS = flags.FLAGS
pc.define_flags()
flags.DEFINE_string("prompts_file", pc.SHIPPED_TEXT,
                    "Text file, one prompt per line; base points are drawn from its lines.")
flags.DEFINE_integer("n_base", 64, "Number of base points (prompts), a seeded sample of the lines.")
flags.DEFINE_list("types", list(D.DIRECTION_TYPES), "Direction types to run (see docs/directions.md).")
flags.DEFINE_integer("n_directions", 8,
                     "Directions per base point for real, random, matched, cov_diff and "
                     "cov_sample; mixture makes n_directions // 2 mixtures of pairs of the real ones.")
flags.DEFINE_float("max_length", 2.0, "Largest step length, in units of D.")
flags.DEFINE_integer("n_lengths", 32, "Step lengths linspace(0, max_length, n_lengths).")
flags.DEFINE_float("kl_threshold", 0.5, "KL (nats) defining the activation threshold.")
flags.DEFINE_float("sensitive_length", 0.5, "Fixed perturbation length (units of D) at which "
                   "the sensitive directions maximise the output change.")
flags.DEFINE_enum("sensitive_objective", "kl", list(D.OBJECTIVES),
                  "kl: next-token KL; distance: |change| of resid_post at --sensitive_target_layer.")
flags.DEFINE_integer("sensitive_target_layer", -1, "Layer of the distance objective (-1: last).")
flags.DEFINE_integer("sensitive_restarts", 4, "Random restarts per base point (the best is kept).")
flags.DEFINE_integer("sensitive_steps", 100, "Optimiser iterations.")
flags.DEFINE_float("sensitive_lr", 0.05, "Adam learning rate of the search on the unit sphere.")
flags.DEFINE_string("steering_a", "The house was large|A large dog|The large tree|It was very large",
                    "Prompt set A ('|'-separated): the steering direction is mean(A) - mean(B) "
                    "of their last positions' activations.")
flags.DEFINE_string("steering_b", "The house was small|A small dog|The small tree|It was very small",
                    "Prompt set B ('|'-separated).")

PER_BASE = ("real", "random", "matched", "cov_diff", "cov_sample")


def check_flags() -> None:
    pc.check_common_flags()
    bad = [t for t in FLAGS.types if t not in D.DIRECTION_TYPES]
    if bad or not FLAGS.types:
        raise pc.InputError(f"--types: {bad or 'none given'}; choose from {D.DIRECTION_TYPES}.")
    if len(set(FLAGS.types)) != len(FLAGS.types):
        raise pc.InputError(f"--types={FLAGS.types}: a type is listed twice.")
    if not os.path.isfile(FLAGS.prompts_file):
        raise pc.InputError(f"--prompts_file={FLAGS.prompts_file!r} does not exist.")
    if FLAGS.n_base < 2:
        raise pc.InputError("--n_base must be >= 2 (real directions point to other base points).")
    if FLAGS.n_directions < 1:
        raise pc.InputError("--n_directions must be >= 1.")
    if "real" in FLAGS.types and FLAGS.n_directions > FLAGS.n_base - 1:
        raise pc.InputError(f"--n_directions={FLAGS.n_directions} real directions need "
                            f"--n_base >= {FLAGS.n_directions + 1} (each targets another base point).")
    if "mixture" in FLAGS.types and ("real" not in FLAGS.types or FLAGS.n_directions < 2):
        raise pc.InputError("mixture compares mixtures against their pure real directions: "
                            "list 'real' in --types and use --n_directions >= 2.")
    try:
        D.length_grid(FLAGS.max_length, FLAGS.n_lengths)
    except ValueError as e:
        raise pc.InputError(f"--max_length/--n_lengths: {e}")
    if not FLAGS.kl_threshold > 0:
        raise pc.InputError("--kl_threshold must be > 0 nats.")
    if "sensitive" in FLAGS.types and not (FLAGS.sensitive_length > 0 and FLAGS.sensitive_steps >= 1
                                           and FLAGS.sensitive_restarts >= 1
                                           and FLAGS.sensitive_lr > 0):
        raise pc.InputError("--sensitive_length, --sensitive_lr must be > 0 and "
                            "--sensitive_steps, --sensitive_restarts >= 1.")
    if "steering" in FLAGS.types and not (pc.split_prompts(FLAGS.steering_a)
                                          and pc.split_prompts(FLAGS.steering_b)):
        raise pc.InputError("steering needs prompts in both --steering_a and --steering_b.")


def base_prompts(model):
    """A seeded sample of ``--n_base`` lines of ``--prompts_file`` with >= 2 tokens."""
    texts = reference_lib.read_prompts(FLAGS.prompts_file)
    prompts, kept = reference_lib.tokenize_prompts(model, texts, FLAGS.max_tokens, 2)
    if len(prompts) < FLAGS.n_base:
        raise pc.InputError(f"--prompts_file has {len(prompts)} usable lines (>= 2 tokens); "
                            f"--n_base={FLAGS.n_base} needs that many.")
    pick = np.sort(np.random.default_rng(FLAGS.seed).choice(len(prompts), FLAGS.n_base,
                                                            replace=False))
    return [prompts[i] for i in pick], [texts[kept[i]] for i in pick]


def make_directions(model, prompts, base, ref):
    """``(directions [B, M, d], type of each column [M], extras)`` for the chosen types."""
    B, d = base.shape
    n = FLAGS.n_directions
    key = jax.random.PRNGKey(FLAGS.seed)
    keys = dict(zip(D.DIRECTION_TYPES, jax.random.split(key, len(D.DIRECTION_TYPES))))
    xb = jnp.asarray(base)
    cols, types, extras = [], [], {}
    factor = None
    if {"matched", "cov_diff", "cov_sample"} & set(FLAGS.types):
        factor = jnp.asarray(ref.gaussian_factor(), jnp.float32)
        mean = jnp.asarray(ref.mean, jnp.float32)

    def add(name, u):
        cols.append(np.asarray(u, np.float32))
        types.extend([name] * u.shape[1])

    for name in FLAGS.types:
        if name == "real":
            u, idx = D.real_directions(keys[name], xb, xb, n, jnp.arange(B))
            extras["real_target"] = np.asarray(idx)
            extras["real_columns"] = np.arange(len(types), len(types) + n)
            add(name, u)
        elif name == "random":
            add(name, D.random_directions(keys[name], B, n, d))
        elif name == "matched":
            add(name, D.matched_directions(keys[name], xb, mean, factor, n))
        elif name == "cov_diff":
            add(name, D.cov_diff_directions(keys[name], mean, factor, B, n))
        elif name == "cov_sample":
            add(name, D.cov_sample_directions(keys[name], mean, factor, B, n))
    if "mixture" in FLAGS.types:
        real_cols = extras["real_columns"]
        m = n // 2
        real = np.concatenate(cols, axis=1)[:, real_cols[: 2 * m]]
        extras["mixture_pairs"] = np.stack([real_cols[0: 2 * m: 2], real_cols[1: 2 * m: 2]], 1)
        add("mixture", D.mixture_directions(jnp.asarray(real)))
    if "steering" in FLAGS.types:
        sa = pc.tokens_of(model, pc.split_prompts(FLAGS.steering_a), "--steering_a")
        sb = pc.tokens_of(model, pc.split_prompts(FLAGS.steering_b), "--steering_b")
        acts = reference_lib.collect_activations(model, sa + sb, FLAGS.layer, FLAGS.site,
                                                 batch_size=FLAGS.batch_size)
        v, norm = D.steering_direction(acts[: len(sa)], acts[len(sa):])
        extras["steering_norm"] = np.float64(norm / ref.typical_distance)
        add("steering", np.broadcast_to(v.astype(np.float32), (B, 1, d)))
    if "sensitive" in FLAGS.types:
        target = FLAGS.sensitive_target_layer
        target = model.config.n_layer - 1 if target < 0 else target
        res = D.find_sensitive_directions(
            model, prompts, base, FLAGS.layer, FLAGS.site, ref.typical_distance,
            length=FLAGS.sensitive_length, restarts=FLAGS.sensitive_restarts,
            steps=FLAGS.sensitive_steps, learning_rate=FLAGS.sensitive_lr,
            objective=FLAGS.sensitive_objective, target_layer=target, seed=FLAGS.seed,
            batch_size=max(FLAGS.batch_size, 64), progress_desc="sensitive search")
        extras.update(sensitive_objective=res.objective, sensitive_trace=res.trace,
                      sensitive_length=np.float64(res.length),
                      sensitive_objective_name=np.str_(res.objective_name),
                      sensitive_target_layer=np.int64(res.target_layer))
        add("sensitive", res.best)
    return np.concatenate(cols, axis=1), np.asarray(types), extras


def _fmt(q) -> str:
    med, lo, hi = (float(q[k]) for k in ("median", "q25", "q75"))
    return "n/a" if not np.isfinite(med) else f"{med:.3g} [{lo:.3g}, {hi:.3g}]"


def summary_markdown(res, summary, model_name: str) -> str:
    lines = [f"# Directions: {model_name}, blocks.{FLAGS.layer}.hook_{FLAGS.site}", "",
             f"{FLAGS.n_base} base points; step lengths 0..{FLAGS.max_length:g} D in "
             f"{FLAGS.n_lengths} steps, D = {float(res['typical_distance']):.4g} (median distance "
             f"between reference activations); activation threshold: first t with KL >= "
             f"{FLAGS.kl_threshold:g} nats. Medians [IQR] over base points x directions.", "",
             "| type | curves | threshold t* (D) | never reached | sharpness S (logits) | "
             f"KL at t = {FLAGS.max_length:g} D (nats) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        kl_end = {k: v[-1] for k, v in s["kl"].items()}
        lines.append(f"| {name} | {int(s['n'])} | {_fmt(s['threshold'])} | "
                     f"{100 * float(s['never']):.0f}% | {_fmt(s['sharpness'])} | {_fmt(kl_end)} |")
    if "mixture_pairs" in res:
        thr = res["threshold"]
        mix = thr[:, res["types"] == "mixture"]
        pa, pb = thr[:, res["mixture_pairs"][:, 0]], thr[:, res["mixture_pairs"][:, 1]]
        ok = np.isfinite(mix) & np.isfinite(pa) & np.isfinite(pb)
        if ok.any():
            lines += ["", f"Mixtures against their pure real directions ({int(ok.sum())} with all "
                      "three thresholds): mixture above both pure thresholds in "
                      f"{100 * np.mean(mix[ok] > np.maximum(pa, pb)[ok]):.0f}%, below both in "
                      f"{100 * np.mean(mix[ok] < np.minimum(pa, pb)[ok]):.0f}%; median "
                      f"t*(mixture) / mean t*(pure) = "
                      f"{np.median(mix[ok] / (0.5 * (pa + pb))[ok]):.3g}."]
    if "steering_norm" in res:
        lines += ["", f"Steering vector mean(A) - mean(B): natural length "
                  f"{float(res['steering_norm']):.3g} D."]
    if "sensitive_objective" in res:
        lines += ["", f"Sensitive search at t = {float(res['sensitive_length']):g} D: best "
                  f"objective ({res['sensitive_objective_name']}) median "
                  f"{np.median(res['sensitive_objective'][:, 0]):.4g}."]
    return "\n".join(lines) + "\n"


@common.cli
def main(argv):
    del argv
    pc.run("directions", __name__, check_flags, compute)


def compute(model, ref, out: str) -> None:
    """Everything of one run, written into the staging directory ``out``."""
    prompts, texts = base_prompts(model)
    base = np.asarray(reference_lib.collect_activations(
        model, prompts, FLAGS.layer, FLAGS.site, batch_size=FLAGS.batch_size))
    dirs, types, extras = make_directions(model, prompts, base, ref)
    lengths = D.length_grid(FLAGS.max_length, FLAGS.n_lengths)
    logging.info("%d base points x %d directions x %d lengths", *dirs.shape[:2], lengths.size)
    resp = D.perturbation_responses(model, prompts, base, dirs, lengths, FLAGS.layer, FLAGS.site,
                                    ref.typical_distance, batch_size=FLAGS.batch_size,
                                    progress_desc="responses")
    names = [t for t in D.DIRECTION_TYPES if t in set(types.tolist())]
    summary = D.summarize(resp, types, FLAGS.kl_threshold, names)
    res = dict(
        model_name=np.str_(model.name), layer=np.int64(FLAGS.layer), site=np.str_(FLAGS.site),
        lengths=lengths, typical_distance=np.float64(ref.typical_distance),
        kl_threshold=np.float64(FLAGS.kl_threshold), types=types, type_names=np.asarray(names),
        base_prompts=np.asarray(texts), base=base, directions=dirs, kl=resp.kl,
        rel_distance=resp.rel_distance(), dist=resp.dist, logit_dist=resp.logit_dist,
        top=resp.top, threshold=resp.thresholds(FLAGS.kl_threshold),
        sharpness=resp.sharpness(), **extras)
    for stat in ("kl",):
        for q in ("median", "q25", "q75"):
            res[f"summary_{stat}_{q}"] = np.stack([summary[n][stat][q] for n in names])
    for stat in ("threshold", "sharpness"):
        res[f"summary_{stat}"] = np.array([[summary[n][stat][q] for q in ("q25", "median", "q75")]
                                           for n in names])
    res["summary_never"] = np.array([summary[n]["never"] for n in names])
    files.atomic_save_npz(os.path.join(out, "results.npz"), **res)
    text = summary_markdown(res, summary, model.name)
    files.atomic_write_bytes(os.path.join(out, "summary.md"), text.encode())
    paths = plotting.save_all(res, out, FLAGS.figure_format)
    print(text)
    logging.info("Staged %s", ", ".join(["reference.npz", "results.npz", "summary.md"]
                                        + [os.path.basename(p) for p in paths]))


if __name__ == "__main__":
    common.run(main)
