"""Sweep throughput (issue: plateau statistics at scale).

1. Ours: pairs/s of :class:`plateau_jax.sweep.SweepEngine` on a GPT-2-small-sized random model,
   50 steps, interpolation at layer 0 (resid_post), every downstream recording layer plus the
   logits, exact MLP Jacobian Frobenius norms (Gram path) at every step, spline densities, KL,
   and boundary refinement to 1e-3 (work the baseline does not do). Steady state: the first
   (compiling) batch is timed separately.
2. Baseline, the study's per-pair way, on the same weights in the same process: transformers'
   PyTorch GPT2LMHeadModel with hooks, one alpha step at a time over the full sequence, and for
   every step and downstream layer the MLP Jacobian by ``torch.func.jacrev`` (chunk 128) and its
   Frobenius norm. Its cost per step is constant, so by default ``--baseline_steps`` of the 50
   steps are timed and the per-pair time is extrapolated (``--baseline_steps=50`` times all).
3. Scaling: ours with 1, 2, 4, 8 simulated CPU devices (``XLA_FLAGS=
   --xla_force_host_platform_device_count=N``, one subprocess each), same batch. On a machine
   with 2 cores the simulated devices share those cores, so this shows the sharding overhead, not
   a speed-up. To fit 8 replicas in memory the scaling runs use ``--scaling_layers`` layers.

Usage: python -m benchmarks.bench_sweep [--pairs=8 --batches=2 --ctx=8 --baseline_steps=5]
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("size", "gpt2", "Preset of the model (random weights).")
flags.DEFINE_integer("pairs", 8, "Pairs per batch.")
flags.DEFINE_integer("batches", 2, "Timed batches (after the compiling one).")
flags.DEFINE_integer("ctx", 8, "Context length in tokens.")
flags.DEFINE_integer("n_steps", 50, "Alpha steps.")
flags.DEFINE_float("tol", 1e-3, "Refinement tolerance (0: off).")
flags.DEFINE_integer("baseline_steps", 5, "Baseline alpha steps actually timed (of n_steps).")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated device counts for the scaling run.")
flags.DEFINE_integer("scaling_layers", 4, "n_layer of the model in the scaling runs (0: full).")
flags.DEFINE_bool("skip_baseline", False, "")
flags.DEFINE_bool("skip_scaling", False, "")
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
FLAGS = flags.FLAGS


def _inputs(cfg, n, ctx, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (n, ctx)).astype(np.int32)
    toks = rng.integers(0, cfg.vocab_size, (n, 2)).astype(np.int32)
    return ids, np.full(n, ctx, np.int32), toks[:, 0], toks[:, 1]


def bench_ours(model, pairs, batches, ctx, n_steps, tol):
    import jax

    from plateau_jax.sweep import SweepEngine, SweepSpec
    spec = SweepSpec(layers=(0,), n_steps=n_steps, tol=tol)
    eng = SweepEngine(model, spec)
    ids, lengths, ta, tb = _inputs(model.config, pairs, ctx)
    t = time.perf_counter()
    eng.run(0, ids, lengths, ta, tb)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(batches):
        ids, lengths, ta, tb = _inputs(model.config, pairs, ctx, seed=i + 1)
        eng.run(0, ids, lengths, ta, tb)
    dt = time.perf_counter() - t
    return {"pairs_per_s": pairs * batches / dt, "first_batch_s": first,
            "devices": jax.device_count(), "refine_rounds": spec.rounds}


def bench_baseline(ckpt_dir, cfg, ctx, n_steps, steps_timed):
    """The study's way: per pair, per alpha step a full forward with a hook, then jacrev per layer."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(ckpt_dir, attn_implementation="eager").eval()
    blocks = model.transformer.h
    L = 0
    ids, _, ta, tb = _inputs(cfg, 1, ctx, seed=99)
    seq = lambda t: torch.tensor(np.concatenate([ids[0], [t]])[None], dtype=torch.long)
    out0 = lambda o: o[0] if isinstance(o, tuple) else o

    def slerp(a, b, alpha):
        na, nb = a.norm(), b.norm()
        ah, bh = a / na, b / nb
        th = torch.arccos(torch.clamp(ah @ bh, -1, 1))
        return (torch.sin((1 - alpha) * th) * ah + torch.sin(alpha * th) * bh) / torch.sin(th) * (
            (1 - alpha) * na + alpha * nb)

    t0 = time.perf_counter()
    with torch.no_grad():
        ends = []
        for tok in (ta[0], tb[0]):
            cap = {}
            h = blocks[L].register_forward_hook(lambda m, i, o: cap.__setitem__("x", out0(o)[0, -1].clone()))
            model(seq(tok))
            h.remove()
            ends.append(cap["x"])
    alphas = np.linspace(0, 1, n_steps)
    jac_norms, rs = [], []
    for k in range(steps_timed):
        x = slerp(ends[0], ends[1], float(alphas[k]))
        rec = {}

        def patch(m, i, o):
            hs = out0(o).clone()
            hs[0, -1] = x
            return (hs,) + tuple(o[1:]) if isinstance(o, tuple) else hs

        hooks = [blocks[L].register_forward_hook(patch)]
        for l in range(L + 1, cfg.n_layer):
            hooks.append(blocks[l].ln_2.register_forward_pre_hook(
                lambda m, i, l=l: rec.__setitem__(("mid", l), i[0][0, -1].clone())))
            hooks.append(blocks[l].mlp.c_fc.register_forward_hook(
                lambda m, i, o, l=l: rec.__setitem__(("pre", l), o[0, -1].clone())))
            hooks.append(blocks[l].register_forward_hook(
                lambda m, i, o, l=l: rec.__setitem__(("post", l), out0(o)[0, -1].clone())))
        with torch.no_grad():
            logits = model(seq(ta[0])).logits[0, -1]
        for h in hooks:
            h.remove()
        norms = []
        for l in range(L + 1, cfg.n_layer):
            blk = blocks[l]
            J = torch.func.jacrev(lambda hh: blk.mlp(blk.ln_2(hh)), chunk_size=128)(rec[("mid", l)])
            norms.append(float(torch.linalg.norm(J)))
        jac_norms.append(norms)
        rs.append(logits)
    dt = time.perf_counter() - t0
    per_pair = dt * n_steps / steps_timed  # endpoints are ~2 steps' forward; counted once, scaled
    return {"seconds_timed": dt, "steps_timed": steps_timed,
            "pairs_per_s": 1.0 / per_pair, "extrapolated": steps_timed < n_steps,
            "torch_threads": torch.get_num_threads()}


_CHILD = r"""
import json, sys
sys.path.insert(0, ".")
import jax, plateau_jax as pj
from benchmarks.bench_sweep import bench_ours
cfg = pj.GPT2Config.preset(sys.argv[1], **({{"n_layer": int(sys.argv[2])}} if int(sys.argv[2]) else {{}}))
m = pj.init_model(cfg, seed=0)
print("RESULT", json.dumps(bench_ours(m, {pairs}, {batches}, {ctx}, {n_steps}, {tol})))
"""


def bench_scaling(devices, size, layers):
    out = {}
    code = _CHILD.format(pairs=FLAGS.pairs, batches=FLAGS.batches, ctx=FLAGS.ctx,
                         n_steps=FLAGS.n_steps, tol=FLAGS.tol)
    for n in devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
        res = subprocess.run([sys.executable, "-c", code, size, str(layers)], env=env,
                             capture_output=True, text=True)
        line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")]
        out[int(n)] = json.loads(line[0][7:]) if line else {"error": res.stderr[-2000:]}
        print(f"  {n} device(s): {out[int(n)]}", flush=True)
    return out


def main(argv):
    del argv
    import plateau_jax as pj
    from plateau_jax.model.loading import save_gpt2

    cfg = pj.GPT2Config.preset(FLAGS.size)
    model = pj.init_model(cfg, seed=0)
    results = {"model": FLAGS.size, "pairs_per_batch": FLAGS.pairs, "ctx": FLAGS.ctx,
               "n_steps": FLAGS.n_steps, "tol": FLAGS.tol}
    print(f"ours ({FLAGS.size}, {FLAGS.n_steps} steps, layer 0, every recording layer, Jacobian "
          f"norms, refinement tol {FLAGS.tol}) ...", flush=True)
    results["ours"] = bench_ours(model, FLAGS.pairs, FLAGS.batches, FLAGS.ctx, FLAGS.n_steps,
                                 FLAGS.tol)
    print(f"  {results['ours']}", flush=True)
    if not FLAGS.skip_baseline:
        with tempfile.TemporaryDirectory() as d:
            save_gpt2(model, d)
            print(f"baseline (torch, per step, jacrev; {FLAGS.baseline_steps} of {FLAGS.n_steps} "
                  "steps timed) ...", flush=True)
            results["baseline"] = bench_baseline(d, cfg, FLAGS.ctx, FLAGS.n_steps,
                                                 FLAGS.baseline_steps)
        print(f"  {results['baseline']}", flush=True)
        results["speedup"] = results["ours"]["pairs_per_s"] / results["baseline"]["pairs_per_s"]
        print(f"speed-up ours / baseline: {results['speedup']:.1f}x", flush=True)
    del model
    if not FLAGS.skip_scaling:
        print(f"scaling (n_layer={FLAGS.scaling_layers or cfg.n_layer}, simulated CPU devices "
              "sharing this machine's cores) ...", flush=True)
        results["scaling"] = bench_scaling(FLAGS.devices, FLAGS.size, FLAGS.scaling_layers)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
