"""Interpolation at every layer: the study's way against the prefix-cached continuation.

Same random GPT-2-small-sized weights, same run: P pairs x n steps x every interpolation
layer, recording the default components of every later layer and the logits.

* study: endpoints from one full forward of both prompts; then, for each interpolation layer,
  one batched full forward of context + last token (all pairs and steps) with the
  interpolated vector substituted at the last position (``forward(..., patches=...)``),
  recording every position (as TransformerLens' cache does) and keeping the last.
* ours: the context runs once (:func:`plateau_jax.run_prefix`), endpoints for every layer
  in one continuation, then one :func:`plateau_jax.plateau.interpolation_run` per layer.

"cold" includes jit compilation (one per layer for both), "warm" is an identical later pass
(``--reps`` of them; the two ways alternate, so load changes on a shared machine hit both).
Usage (repo root)::

    python -m benchmarks.bench_interpolation            # 12 layers, 2 x 50 steps, ctx 4 and 64
    python -m benchmarks.bench_interpolation --quick    # 4 layers, 2 x 10 steps, ctx 4 and 16
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import plateau_jax
from plateau_jax.plateaus import paths
from plateau_jax.plateaus import interpolation


def _block(tree):
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def study_way(model, ctx, tokens, alpha):
    """Full forwards with the substitution; returns {layer: (logits, acts)} at the last position."""
    cfg = model.config
    P = tokens.shape[0]
    ids = np.concatenate([np.repeat(ctx[None], 2 * P, 0), tokens.reshape(-1, 1)], 1)
    resid = [plateau_jax.site(l, "resid_post") for l in range(cfg.n_layer)]
    _, rec = plateau_jax.forward(model, ids, sites=resid)
    out = {}
    for layer in range(cfg.n_layer):
        ends = rec[resid[layer]][:, -1].reshape(P, 2, -1)
        x = paths.interpolate(ends[:, 0], ends[:, 1], alpha).reshape(P * alpha.size, -1)
        names = [interpolation.component_site(l, c) for l in range(layer + 1, cfg.n_layer)
                 for c in interpolation.DEFAULT_COMPONENTS]
        batch_ids = np.repeat(ids[::2], alpha.size, 0)  # context + token A; the last is overwritten
        logits, acts = plateau_jax.forward(model, batch_ids, sites=names,
                                           patches={resid[layer]: x})
        out[layer] = (logits[:, -1], {k: v[:, -1] for k, v in acts.items()})
        _block(out[layer])
    return out


def our_way(model, ctx, tokens, alpha):
    cfg = model.config
    P = tokens.shape[0]
    prefix = plateau_jax.run_prefix(model, ctx)
    ends = interpolation.endpoint_activations(model, prefix, tokens.ravel(), range(cfg.n_layer))
    ends = ends.reshape(cfg.n_layer, P, 2, -1)
    out = {}
    for layer in range(cfg.n_layer):
        run = interpolation.interpolation_run(model, prefix, ends[layer, :, 0], ends[layer, :, 1], layer,
                                        alpha, check_finite=False)
        out[layer] = (run.logits, run.acts)
        _block(out[layer])
    return out


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 10 steps, contexts 4 and 16")
    ap.add_argument("--contexts", default=None, help="comma list of context lengths (4,64)")
    ap.add_argument("--steps", type=int, default=None, help="alpha steps (50)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--n_layer", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--reps", type=int, default=1, help="warm passes (study and ours alternate)")
    args = ap.parse_args()
    contexts = [int(c) for c in (args.contexts or ("4,16" if args.quick else "4,64")).split(",")]
    steps = args.steps or (10 if args.quick else 50)
    overrides = {"n_layer": args.n_layer or (4 if args.quick else None)}
    config = plateau_jax.GPT2Config.preset(args.preset, **{k: v for k, v in overrides.items() if v})
    model = plateau_jax.init_model(config, seed=0)
    alpha = paths.alpha_grid(steps)
    rng = np.random.default_rng(0)
    print(f"device {jax.devices()[0]}, {args.preset} sized (n_layer={config.n_layer}, "
          f"d={config.n_embd}), random weights; {args.pairs} pairs x {steps} steps x "
          f"{config.n_layer} interpolation layers")
    print(f"{'context':>8} {'pass':>5} {'study s':>9} {'ours s':>8} {'speed-up':>9} {'max |diff|':>11}")
    for T in contexts:
        ctx = rng.integers(0, config.vocab_size, T).astype(np.int32)
        tokens = rng.integers(0, config.vocab_size, (args.pairs, 2)).astype(np.int32)
        for label in ["cold"] + ["warm"] * args.reps:
            t_study, ref = _timed(study_way, model, ctx, tokens, alpha)
            t_ours, got = _timed(our_way, model, ctx, tokens, alpha)
            diff = max(float(np.max(np.abs(np.asarray(got[l][0]).reshape(ref[l][0].shape)
                                           - np.asarray(ref[l][0])))) for l in ref)
            print(f"{T:>8} {label:>5} {t_study:>9.2f} {t_ours:>8.2f} {t_study / t_ours:>8.1f}x "
                  f"{diff:>11.2e}", flush=True)
            del ref, got


if __name__ == "__main__":
    main()
