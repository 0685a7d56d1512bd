"""Interpolation at every layer: the study's loop against the prefix-cached continuation.

Same random weights, same process, interleaved, pinned threads (:mod:`benchmarks.harness`):
``--pairs`` pairs x ``--steps`` steps x every interpolation layer, recording attn_out,
resid_mid, mlp_pre, mlp_out and resid_post of every later layer and the logits.

* study loop (PyTorch, :meth:`benchmarks.torch_reference.TorchGPT2.study_loop`): per pair and
  layer, the endpoints by two forwards, then one full forward per alpha step with the value fed
  through a hook. Timed on ``--baseline_steps`` steps per (pair, layer) and scaled linearly.
* jax full forward: the same in plateau_jax, batched: one full forward of context + token per
  layer for all pairs and steps, the last position patched (what the study's loop costs
  without its per-step Python loop).
* ours: the context once (:func:`plateau_jax.run_prefix`), endpoints of every layer in one
  continuation, then one :func:`~plateau_jax.plateaus.interpolation.interpolation_run` per layer.

    python benchmarks/bench_interpolation.py                       # GPT-2 small size, 12 layers
    python benchmarks/bench_interpolation.py --n_layer=4 --steps=10 --ctx=16 --repeats=1
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, harness  # noqa: E402

RECORDED = ("attn_out", "resid_mid", "mlp_pre", "mlp_out", "resid_post")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--ctx", type=int, default=4, help="context length (random tokens)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--baseline", default="true", choices=["true", "false"])
    ap.add_argument("--baseline_steps", type=int, default=3,
                    help="study loop: steps timed per (pair, layer), scaled (0: all)")
    ap.add_argument("--jax_full_forward", default="true", choices=["true", "false"])
    harness.add_flags(ap)
    return ap


def _config(args) -> dict:
    return {**common.model_config(args), "ctx": args.ctx, "steps": args.steps,
            "pairs": args.pairs, "baseline_steps": args.baseline_steps}


def jax_full_forward(model, ctx, tokens, alpha):
    """Full forwards with the substitution; {layer: (logits, acts)} at the last position."""
    import numpy as np

    import plateau_jax as pj
    from plateau_jax.plateaus import paths

    cfg, P = model.config, tokens.shape[0]
    ids = np.concatenate([np.repeat(ctx[None], 2 * P, 0), tokens.reshape(-1, 1)], 1)
    resid = [pj.site_name(l, "resid_post") for l in range(cfg.n_layer)]
    _, rec = pj.forward(model, ids, sites=resid)
    out = {}
    for layer in range(cfg.n_layer - 1):
        ends = np.asarray(rec[resid[layer]])[:, -1].reshape(P, 2, -1)
        x = paths.interpolate(ends[:, 0], ends[:, 1], alpha).reshape(P * alpha.size, -1)
        names = [pj.site_name(l, c) for l in range(layer + 1, cfg.n_layer)
                 for c in RECORDED]
        batch_ids = np.repeat(ids[::2], alpha.size, 0)  # context + token A; the last is patched
        logits, acts = pj.forward(model, batch_ids, sites=names, patches={resid[layer]: x})
        out[layer] = harness.block((logits[:, -1], {k: v[:, -1] for k, v in acts.items()}))
    return out


def ours(model, ctx, tokens, alpha):
    import plateau_jax as pj
    from plateau_jax.plateaus import interpolation

    cfg, P = model.config, tokens.shape[0]
    prefix = pj.run_prefix(model, ctx)
    ends = interpolation.endpoint_activations(model, prefix, tokens.ravel(), range(cfg.n_layer))
    ends = ends.reshape(cfg.n_layer, P, 2, -1)
    out = {}
    for layer in range(cfg.n_layer - 1):
        run = interpolation.interpolation_run(model, prefix, ends[layer, :, 0], ends[layer, :, 1],
                                              layer, alpha, components=RECORDED,
                                              check_finite=False)
        out[layer] = (run.logits, run.acts)
    return out


def main(argv=None):
    import numpy as np

    args, report = harness.start("bench_interpolation", build_parser(), _config, argv)
    from plateau_jax.plateaus import paths

    model, directory = common.load(args, need_dir=args.baseline == "true")
    cfg = model.config
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, cfg.vocab_size, args.ctx).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (args.pairs, 2)).astype(np.int32)
    alpha = paths.alpha_grid(args.steps)
    sides, scales, sampled = {}, {}, {}
    if args.baseline == "true":
        from benchmarks.torch_reference import TorchGPT2, sample_steps

        tm = TorchGPT2(directory, ctx, device=harness.torch_device())
        ks = sample_steps(args.steps, args.baseline_steps)
        sides["study loop"] = lambda: [tm.study_loop(int(a), int(b), layer, args.steps, ks,
                                                     jacobians=False)
                                       for a, b in tokens for layer in range(cfg.n_layer - 1)]
        scales["study loop"] = args.steps / len(ks)
        if len(ks) < args.steps:
            sampled["study loop"] = (f"{len(ks)} of {args.steps} steps per (pair, layer), "
                                     "scaled linearly (endpoint forwards scaled too)")
    if args.jax_full_forward == "true":
        sides["jax full forward"] = lambda: jax_full_forward(model, ctx, tokens, alpha)
    sides["ours"] = lambda: ours(model, ctx, tokens, alpha)
    keep = {}
    t = harness.compare(sides, args.repeats, scales, sampled, keep)
    got = keep["ours"]
    what = (f"{args.pairs} pairs x {args.steps} steps x {cfg.n_layer - 1} interpolation layers, "
            f"context {args.ctx} tokens")
    if "study loop" in t:
        L1, ref = cfg.n_layer - 1, keep["study loop"]
        diff = max(float(np.max(np.abs(np.asarray(got[l][0])[p, ks] - ref[p * L1 + l]["logits"])))
                   for p in range(args.pairs) for l in range(L1))
        report.add("interp", what + " (baseline: the study's torch loop)",
                   {k: t[k] for k in ("study loop", "ours")}, baseline="study loop",
                   max_abs_logit_diff=diff)
    if "jax full forward" in t:
        ref = keep["jax full forward"]
        diff = max(float(np.max(np.abs(np.asarray(got[l][0]).reshape(ref[l][0].shape)
                                       - np.asarray(ref[l][0])))) for l in ref)
        report.add("interp_full_forward", what + " (baseline: full forwards in plateau_jax)",
                   {k: t[k] for k in ("jax full forward", "ours")},
                   baseline="jax full forward", max_abs_logit_diff=diff)
    common.cleanup(directory, args)
    return report.finish()


if __name__ == "__main__":
    main()
