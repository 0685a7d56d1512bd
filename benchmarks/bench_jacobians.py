r"""Jacobian sweeps: the study's loop (per step ``torch.func.jacrev``, chunk 128, on transformers'
PyTorch GPT-2, :mod:`benchmarks.torch_reference`) against plateau_jax, same weights, same process,
interleaved, pinned to the same thread count (:mod:`benchmarks.harness`).

    python benchmarks/bench_jacobians.py                          # GPT-2 small size, 12 x 50
    python benchmarks/bench_jacobians.py --steps=6 --pairs=4 --repeats=1   # a quick look
    python benchmarks/bench_jacobians.py --model=DIR --threads=0  # a checkpoint (GPU: no pinning)

Interpolation at ``blocks.0.hook_resid_pre`` (``--site=resid_post`` for the study's entry), so
every layer has an MLP Jacobian at every step. Workloads (``--workloads``):

 (a) full MLP Jacobian matrices, every layer x step. Ours: the closed form
     (:func:`plateau_jax.jacobians.mlp.mlp_jacobian`) in one jitted sweep, the matrices left on
     the device; also a plain matmul of the same FLOPs and the FLOP counts of both sides.
 (b) MLP Jacobian Frobenius norms: one pair (ours: the exact Gram formula, the per-layer Gram
     matrices computed inside the call) and ``--pairs`` pairs (Gram matrices once, then one
     sweep per pair, its path included), per pair.
 (c) cumulative Jacobian norms at every depth from the entry (ours: one forward-mode pass)
     against the study's single final depth d resid_post[last] / d x (jacrev through the whole
     HF model with hooks, context included, as TransformerLens' run_with_hooks does).

The baseline of (a)/(b) is the study's loop over layers and steps, keeping every matrix and
taking its norm; it is given the resid_mid activations (computed by us, untimed). Per-step
baselines are timed on ``--baseline_steps`` / ``--baseline_steps_c`` steps and scaled linearly
to all steps (labelled SAMPLED in the output); ``0`` times every step.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, harness  # noqa: E402


def flops_closed(d: int, m: int) -> float:
    """FLOPs of one closed-form MLP Jacobian (plateau_jax): the [d, m] x [m, d] product, plus the
    lower-order terms (pre-activation, q, the rank-1 update, the diagonal scaling)."""
    return 2.0 * d * d * m + 3 * 2.0 * d * m + d * m + 2.0 * d * d


def flops_jacrev(d: int, m: int) -> float:
    """FLOPs of one ``jacrev`` MLP Jacobian (the study): the forward, then for each of the d
    cotangents the backward through both linear maps (2 x 2 d m each)."""
    return 2 * 2.0 * d * m + d * (2 * 2.0 * d * m)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=20, help="pairs for (b) many pairs")
    ap.add_argument("--site", default="resid_pre", choices=["resid_pre", "resid_post"],
                    help="interpolation at blocks.0.hook_{site}")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--baseline", default="true", choices=["true", "false"])
    ap.add_argument("--baseline_steps", type=int, default=2,
                    help="(a)/(b) baseline: steps timed per layer, scaled to --steps (0: all)")
    ap.add_argument("--baseline_steps_c", type=int, default=1,
                    help="(c) baseline: steps timed, scaled to --steps (0: all)")
    ap.add_argument("--batch_size", type=int, default=0,
                    help="steps per vectorised chunk (0: 2 on CPU, 10 on accelerators)")
    ap.add_argument("--autodiff", action="store_true", help="also time (a) by jacfwd")
    harness.add_flags(ap)
    return ap


def _config(args) -> dict:
    return {**common.model_config(args), "steps": args.steps, "pairs": args.pairs,
            "site": f"blocks.0.hook_{args.site}", "workloads": args.workloads,
            "baseline_steps": args.baseline_steps, "baseline_steps_c": args.baseline_steps_c,
            "batch_size": args.batch_size}


def setup(args):
    """Model, context, path, the recorded resid_mid activations, the torch reference."""
    import numpy as np

    import plateau_jax as pj
    from plateau_jax.jacobians import sweep as jac

    baseline = args.baseline == "true"
    model, directory = common.load(args, need_dir=baseline)
    cfg = model.config
    ctx, tokens = common.context_and_tokens(cfg)
    prefix = pj.run_prefix(model, ctx)
    x = harness.block(common.path(model, prefix, tokens, args.steps, 0, args.site))
    layers = [int(l) for l in jac.sweep_layers(cfg, 0, args.site)]
    s = dict(model=model, dir=directory, ctx=ctx, tokens=tokens, prefix=prefix, x=x,
             layers=layers, bs=common.default_batch_size(args.batch_size))
    print(f"# {cfg.n_layer} layers, d={cfg.d_model}, m={cfg.d_mlp}; {len(layers)} layers x "
          f"{args.steps} steps; batch_size {s['bs']}", flush=True)
    if baseline:
        from benchmarks.torch_reference import TorchGPT2, sample_steps

        sites = [pj.site_name(l, "resid_mid") for l in layers]
        _, rec = pj.continue_from(model, prefix, x, 0, site=args.site, sites=sites)
        s["tm"] = TorchGPT2(directory, ctx, device=harness.torch_device())
        s["mids"] = {l: s["tm"].tensor(np.asarray(rec[n])) for l, n in zip(layers, sites)}
        s["ks"] = sample_steps(args.steps, args.baseline_steps)
    return s


def _sweep(s, **kw):
    from plateau_jax.jacobians import sweep as jac

    return lambda: jac.jacobian_sweep(s["model"], s["prefix"], s["x"], 0, s["site"],
                                      batch_size=s["bs"], to_host=False, **kw)


def _baseline_ab(args, s, sides, scales, sampled):
    if "tm" not in s:
        return
    ks = s["ks"]
    sides["study loop"] = lambda: s["tm"].mlp_jacobians(s["mids"], s["layers"], ks)
    scales["study loop"] = args.steps / len(ks)
    sampled["study loop"] = (f"{len(ks)} of {args.steps} steps per layer, scaled linearly"
                             if len(ks) < args.steps else "")


def bench_ab(args, report, s):
    """(a) full matrices and (b) one pair's norms, interleaved with the study's loop and a plain
    matmul of (a)'s FLOPs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cfg, L, N = s["model"].config, len(s["layers"]), args.steps
    d, m = cfg.d_model, cfg.d_mlp
    sides, scales, sampled = {}, {}, {}
    _baseline_ab(args, s, sides, scales, sampled)
    wl = args.workloads.split(",")
    if "a" in wl:
        sides["ours (a)"] = _sweep(s, families=("mlp",), stats=(), cumulative=False,
                                   full=("mlp",), mlp_method="closed", force=True)
        lhs = jnp.asarray(np.random.default_rng(0).normal(size=(N * d, m)), s["x"].dtype)
        mm = jax.jit(lambda a, b: a @ b)
        w_out = s["model"].params["blocks"]["mlp"]["W_out"][0]
        sides["plain matmul"] = lambda: mm(lhs, w_out)
        scales["plain matmul"] = L
        sampled["plain matmul"] = f"one layer's [{N * d}, {m}] x [{m}, {d}], x {L} layers"
        if args.autodiff:
            sides["ours (a) jacfwd"] = _sweep(s, families=("mlp",), stats=(), cumulative=False,
                                              full=("mlp",), mlp_method="autodiff", force=True)
    if "b" in wl:
        sides["ours (b)"] = _sweep(s, families=("mlp",), stats=("fro",), cumulative=False,
                                   mlp_method="gram")
    keep = {}
    t = harness.compare(sides, args.repeats, scales, sampled, keep)
    base = "study loop" if "study loop" in t else None
    if "a" in wl:
        fl_ours, fl_torch = flops_closed(d, m) * L * N, flops_jacrev(d, m) * L * N
        extra = {"flops_ours": fl_ours, "flops_study": fl_torch,
                 "gflops_per_s_ours": fl_ours / t["ours (a)"].median / 1e9,
                 "gflops_per_s_plain_matmul":
                     2.0 * d * d * m * L * N / t["plain matmul"].median / 1e9,
                 "ours_vs_plain_matmul": t["plain matmul"].median / t["ours (a)"].median}
        if base:
            extra["gflops_per_s_study"] = fl_torch / t[base].median / 1e9
            got = np.asarray(keep["ours (a)"]["mlp_full"])[:, s["ks"]]
            ref = np.stack([J.cpu().numpy() for J in keep[base][0]]).reshape(got.shape)
            extra["max_rel_diff"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        report.add("a", f"full MLP Jacobians, {L} layers x {N} steps (ours: closed form, "
                   "matrices left on the device; FLOPs per layer-step: ours 2d^2m, study 4d^2m)",
                   {k: v for k, v in t.items() if k in (base, "ours (a)", "plain matmul",
                                                         "ours (a) jacfwd")},
                   baseline=base or "", ours="ours (a)", **extra)
    if "b" in wl:
        extra = {}
        if base:
            got = np.asarray(keep["ours (b)"]["mlp_fro"])[:, s["ks"]]
            extra["max_rel_diff"] = float(np.max(np.abs(got - keep[base][1]) / keep[base][1]))
        report.add("b1", f"MLP Jacobian Frobenius norms, one pair, {L} layers x {N} steps "
                   "(ours: Gram formula incl. the per-layer Gram matrices)",
                   {k: v for k, v in t.items() if k in (base, "ours (b)")},
                   baseline=base or "", ours="ours (b)", **extra)
    return t.get(base)


def bench_b_many(args, report, s, base_timing):
    """(b) over ``--pairs`` pairs: Gram matrices once, then one sweep per pair (path included)."""
    import numpy as np

    from plateau_jax.jacobians import sweep as jac

    model, prefix = s["model"], s["prefix"]
    rng = np.random.default_rng(1)
    toks = rng.integers(0, model.config.vocab_size, (args.pairs, 2))
    opts = jac.SweepOptions(families=("mlp",), stats=("fro",), cumulative=False,
                            mlp_method="gram", batch_size=s["bs"])

    def many():
        grams = jac.mlp_grams_for(model)
        out = None
        for ta, tb in toks:
            x = common.path(model, prefix, (ta, tb), args.steps, 0, args.site)
            out = jac.jacobian_sweep(model, prefix, x, 0, args.site, options=opts, grams=grams,
                                     to_host=False)
        return out

    t = harness.compare({"ours (b) many": many}, args.repeats,
                        scales={"ours (b) many": 1.0 / args.pairs},
                        sampled={"ours (b) many": f"per pair over {args.pairs} pairs"})
    if base_timing is not None:
        t = {"study loop": base_timing, **t}
    report.add("b_many", f"MLP Jacobian Frobenius norms per pair over {args.pairs} pairs (ours: "
               "Gram matrices once + one sweep per pair; the study: its loop per pair; study "
               "times from the (a)/(b) run)", t, baseline="study loop", ours="ours (b) many")


def bench_c(args, report, s):
    """(c) cumulative norms at every depth (ours) vs the study's single final depth."""
    import numpy as np

    from benchmarks.torch_reference import sample_steps

    L, N = len(s["layers"]), args.steps
    sides = {"ours (c)": _sweep(s, families=(), stats=("fro",), cumulative=True)}
    scales, sampled = {}, {}
    if "tm" in s:
        tm = s["tm"]
        g = tm.full_stack_fn(0, args.site)
        ks = sample_steps(N, args.baseline_steps_c)
        xs = [tm.tensor(np.asarray(s["x"][k])) for k in ks]

        def study():
            return [tm.torch.linalg.norm(tm.jacobian(g, xk)).item() for xk in xs]

        sides = {"study 1 depth": study, **sides}
        scales["study 1 depth"] = N / len(ks)
        sampled["study 1 depth"] = (f"{len(ks)} of {N} steps, scaled linearly"
                                    if len(ks) < N else "")
    keep = {}
    t = harness.compare(sides, args.repeats, scales, sampled, keep)
    extra = {}
    if "tm" in s:
        ours = np.asarray(keep["ours (c)"]["cumulative_fro"])[-1, ks]
        extra["final_depth_rel_diff"] = float(np.max(np.abs(ours - keep["study 1 depth"])
                                                     / np.asarray(keep["study 1 depth"])))
    report.add("c", f"cumulative Jacobian norms: ours at all {L} depths x {N} steps, the study "
               f"at its single final depth", t, baseline="study 1 depth", ours="ours (c)", **extra)


def main(argv=None):
    args, report = harness.start("bench_jacobians", build_parser(), _config, argv)
    s = setup(args)
    s["site"] = args.site
    report.record["config"].update(layers=len(s["layers"]), n_layer=s["model"].config.n_layer)
    wl = args.workloads.split(",")
    base_timing = None
    if {"a", "b"} & set(wl):
        base_timing = bench_ab(args, report, s)
    if "b" in wl and args.pairs:
        bench_b_many(args, report, s, base_timing)
    if "c" in wl:
        bench_c(args, report, s)
    common.cleanup(s["dir"], args)
    return report.finish()


if __name__ == "__main__":
    main()
