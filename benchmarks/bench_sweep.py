"""Sweep throughput: pairs/s of the sweep engine against the study's per-pair loop.

* ours: :class:`plateau_jax.sweep.SweepEngine` on ``--pairs`` pairs per batch, ``--steps`` steps,
  interpolation at layer 0 (resid_post), every later recording layer plus the logits, exact MLP
  Jacobian Frobenius norms (Gram path) at every step, spline densities, KL, and boundary
  refinement to ``--tol`` (work the baseline does not do). One batch per call; cold = the first
  (compiling) batch.
* study loop (PyTorch, :meth:`benchmarks.torch_reference.TorchGPT2.study_loop`): per pair, one
  forward per alpha step with a hook, then for every later layer the MLP Jacobian by
  ``torch.func.jacrev`` (chunk 128) and its norm. Timed on ``--baseline_steps`` of the steps and
  scaled linearly to a pair.
* ``--workloads=scaling``: ours with 1, 2, 4, 8 simulated CPU devices (one subprocess each,
  ``--xla_force_host_platform_device_count``). On a 2-core machine the simulated devices share
  the cores: this shows the sharding overhead, not a speed-up.

    python benchmarks/bench_sweep.py                          # GPT-2 small size
    python benchmarks/bench_sweep.py --n_layer=2 --pairs=2 --steps=8 --repeats=1
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common, harness  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    ap.add_argument("--ctx", type=int, default=8, help="context length in tokens")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tol", type=float, default=1e-3, help="refinement tolerance (0: off)")
    ap.add_argument("--workloads", default="sweep", help="sweep,scaling")
    ap.add_argument("--baseline", default="true", choices=["true", "false"])
    ap.add_argument("--baseline_steps", type=int, default=3,
                    help="study loop: steps timed per pair, scaled (0: all)")
    ap.add_argument("--devices", default="1,2,4,8", help="simulated device counts (scaling)")
    ap.add_argument("--scaling_layers", type=int, default=4,
                    help="n_layer of the model in the scaling runs (0: the preset's)")
    harness.add_flags(ap)
    return ap


def _config(args) -> dict:
    return {**common.model_config(args), "pairs": args.pairs, "ctx": args.ctx,
            "steps": args.steps, "tol": args.tol, "baseline_steps": args.baseline_steps}


def inputs(config, n: int, ctx: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (n, ctx)).astype(np.int32)
    toks = rng.integers(0, config.vocab_size, (n, 2)).astype(np.int32)
    return ids, np.full(n, ctx, np.int32), toks[:, 0], toks[:, 1]


def engine_batches(model, pairs: int, ctx: int, steps: int, tol: float):
    """A function running one batch of ``pairs`` pairs (new inputs each call)."""
    from plateau_jax.sweep import SweepEngine, SweepSpec

    eng = SweepEngine(model, SweepSpec(layers=(0,), n_steps=steps, tol=tol))
    calls = [0]

    def one_batch():
        calls[0] += 1
        return eng.run(0, *inputs(model.config, pairs, ctx, seed=calls[0]))

    return one_batch


def bench_sweep(args, report):
    model, directory = common.load(args, need_dir=args.baseline == "true")
    sides = {"ours": engine_batches(model, args.pairs, args.ctx, args.steps, args.tol)}
    scales = {"ours": 1.0 / args.pairs}
    sampled = {"ours": f"per pair, batches of {args.pairs}"}
    if args.baseline == "true":
        from benchmarks.torch_reference import TorchGPT2, sample_steps

        ids, _, ta, tb = inputs(model.config, 1, args.ctx, seed=99)
        tm = TorchGPT2(directory, ids[0], device=harness.torch_device())
        ks = sample_steps(args.steps, args.baseline_steps)
        sides = {"study loop": lambda: tm.study_loop(int(ta[0]), int(tb[0]), 0, args.steps, ks),
                 **sides}
        scales["study loop"] = args.steps / len(ks)
        if len(ks) < args.steps:
            sampled["study loop"] = f"{len(ks)} of {args.steps} steps of one pair, scaled linearly"
    t = harness.compare(sides, args.repeats, scales, sampled)
    report.add("sweep", f"seconds per pair: layer 0, {args.steps} steps, every later layer, MLP "
               f"Jacobian norms (ours also: spline densities, KL, refinement to {args.tol})", t,
               baseline="study loop", ours="ours",
               pairs_per_s={k: 1.0 / v.median for k, v in t.items()})
    common.cleanup(directory, args)


_CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from benchmarks import bench_sweep, harness
import plateau_jax as pj
cfg = pj.ModelConfig.preset({size!r}, **({{"n_layer": {layers}}} if {layers} else {{}}))
run = bench_sweep.engine_batches(pj.init_model(cfg, seed=0), {pairs}, {ctx}, {steps}, {tol})
t = harness.compare({{"ours": run}}, {repeats})["ours"]
import jax
print("RESULT", json.dumps({{"pairs_per_s": {pairs} / t.median, "first_batch_s": t.cold,
                            "devices": jax.device_count()}}))
"""


def bench_scaling(args, report):
    code = _CHILD.format(root=ROOT, size=args.size, layers=args.scaling_layers, pairs=args.pairs,
                         ctx=args.ctx, steps=args.steps, tol=args.tol, repeats=args.repeats)
    out = {}
    for n in [int(v) for v in args.devices.split(",")]:
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        try:
            out[n] = harness.child_result(code, env=env)
        except RuntimeError as e:
            out[n] = {"error": str(e)[-2000:]}
    report.note("scaling", f"pairs/s on 1..8 simulated CPU devices sharing this machine's cores "
                f"(n_layer={args.scaling_layers or 'preset'})", results=out)
    for n, r in out.items():
        print(f"[scaling] {n} device(s): {r}")


def main(argv=None):
    return harness.run_workloads("bench_sweep", build_parser(), _config,
                                 {"sweep": bench_sweep, "scaling": bench_scaling}, argv)


if __name__ == "__main__":
    main()
