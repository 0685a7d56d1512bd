r"""Jacobian sweeps: the study's loop (per step torch.func.jacrev, chunk 128, on transformers'
PyTorch GPT-2) against plateau_jax, same random weights, same machine, one run, ratios printed.

    python benchmarks/bench_jacobians.py                 # GPT-2 small size, 12 layers x 50 steps
    python benchmarks/bench_jacobians.py --quick         # 12 layers x 6 steps, 10 pairs
    # GPU suite (GPT-2 Large size, ours only; the torch baseline is CPU-only here):
    python benchmarks/bench_jacobians.py --size=gpt2-large --baseline=false --batch_size=10

Interpolation at ``blocks.0.hook_resid_pre`` so every layer (12 for GPT-2 small) has an MLP
Jacobian at every step. Workloads:
 (a) full MLP Jacobian matrices, every layer x step (ours: closed form, also autodiff jacfwd);
 (b) MLP Jacobian Frobenius norms: one pair (ours: Gram formula incl. its per-layer
     precomputation) and a sweep of ``--pairs`` pairs sharing the precomputation;
 (c) cumulative Jacobian norms at every depth from layer 0 (ours: one jacfwd pass) against the
     study's single final depth d resid_post[last] / d resid_pre[0] (jacrev through the whole
     HF model with hooks, context included, as TransformerLens run_with_hooks does). The
     baseline is timed on ``--baseline_steps_c`` steps and scaled linearly to all steps.
The baseline is given the resid_mid activations for free (computed by us, untimed); ours is
timed end to end from the path (recording included). With --quick our times are steady state
(a second call; first-call times with XLA compilation printed too); otherwise ours is one call
including compilation (conservative). The baseline loops are per step, so with
--baseline_steps_ab/--baseline_steps_c a sample of steps is timed and scaled linearly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plateau_jax as pj  # noqa: E402
from plateau_jax.jacobians import sweep as jac  # noqa: E402
from plateau_jax.plateaus import paths  # noqa: E402


def _block(x):
    return jax.block_until_ready(x)


def _timed(fn, repeat=1):
    """(first-call seconds, best steady-state seconds, result); repeat=0: best = first call."""
    t = time.perf_counter()
    out = _block(fn())
    first = time.perf_counter() - t
    best = first if repeat == 0 else float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = _block(fn())
        best = min(best, time.perf_counter() - t)
    return first, best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--baseline_steps_ab", type=int, default=0,
                    help="time the (a)/(b) baseline on this many steps per layer and scale "
                         "linearly to --steps (0: all steps)")
    ap.add_argument("--baseline_steps_c", type=int, default=1)
    ap.add_argument("--steady", default="auto", choices=["auto", "true", "false"],
                    help="time ours on a second call (steady state); auto: only with --quick. "
                         "Otherwise our single timed call includes XLA compilation.")
    ap.add_argument("--autodiff", action="store_true", help="also time (a') jacfwd full matrices")
    ap.add_argument("--batch_size", type=int, default=10)
    ap.add_argument("--baseline", default="true", choices=["true", "false"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of workloads to skip: a,b,c")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.pairs, args.baseline_steps_c = 6, 10, 1
    baseline = args.baseline == "true"
    steady = args.steady == "true" or (args.steady == "auto" and args.quick)
    skip = set(filter(None, args.skip.split(",")))

    cfg = pj.GPT2Config.preset(args.size)
    print(f"# {args.size}: d={cfg.n_embd} m={cfg.n_inner} layers={cfg.n_layer}; steps={args.steps}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0]}), "
          f"{os.cpu_count()} CPUs visible", flush=True)
    model = pj.init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, cfg.vocab_size, 4)
    prefix = pj.run_prefix(model, ctx)

    def path_for(ta, tb):
        e = pj.embed_last(model, prefix, np.array([ta, tb]))
        return paths.interpolate(e[0], e[1], paths.alpha_grid(args.steps))

    x = _block(path_for(11, 22))
    nL, N, d, m = cfg.n_layer, args.steps, cfg.n_embd, cfg.n_inner
    sites = [pj.site(l, "resid_mid") for l in range(nL)]
    _, rec = pj.continue_from(model, prefix, x, 0, site="resid_pre", sites=sites)
    mids = np.stack([np.asarray(rec[s]) for s in sites])  # [nL, N, d] for the baseline
    res = {}
    bs = args.batch_size

    tm = None
    if baseline:
        import torch
        from torch.func import jacrev
        from transformers import GPT2LMHeadModel

        tmp = tempfile.mkdtemp(prefix="bench_jac_")
        pj.save_gpt2(model, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="eager").eval()
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    # ------------------------------------------------------------------ (a) + (b) baseline
    if baseline and not ({"a", "b"} <= skip):
        ks_ab = (np.arange(N) if not args.baseline_steps_ab else
                 np.linspace(0, N - 1, min(args.baseline_steps_ab, N)).astype(int))
        t = time.perf_counter()
        kept, norms = [], np.zeros((nL, len(ks_ab)))
        for l in range(nL):
            blk = hf.transformer.h[l]
            f = lambda v, blk=blk: blk.mlp(blk.ln_2(v))
            for i, k in enumerate(ks_ab):
                J = jacrev(f, chunk_size=128)(torch.from_numpy(mids[l, k].copy()))
                kept.append(J.detach())  # the study kept every matrix
                norms[l, i] = torch.linalg.norm(J).item()
        res["base_ab"] = (time.perf_counter() - t) * N / len(ks_ab)
        base_J = torch.stack(kept).numpy().reshape(nL, len(ks_ab), d, d)
        del kept
        print(f"baseline (a)+(b) study loop: {res['base_ab']:.2f}s for {nL} layers x {N} steps "
              f"({res['base_ab'] / (nL * N) * 1e3:.1f} ms per layer-step; timed {len(ks_ab)} "
              f"steps per layer{', scaled linearly' if len(ks_ab) < N else ''}); "
              f"{nL * N * 2 * 2.0 * d * d * m / res['base_ab'] / 1e9:.1f} GFLOP/s", flush=True)

    # ------------------------------------------------------------------ (a) ours
    flops_dense = nL * N * 2.0 * d * d * m
    if "a" not in skip:
        run = lambda: jac.jacobian_sweep(model, prefix, x, 0, "resid_pre", families=("mlp",),
                                         stats=(), cumulative=False, full=("mlp",),
                                         mlp_method="closed", batch_size=bs, force=True)
        first, best, out = _timed(run, repeat=int(steady))
        res["ours_a"] = best
        print(f"ours (a) closed-form full matrices: {best:.2f}s (first call {first:.2f}s) "
              f"= {flops_dense / best / 1e9:.1f} GFLOP/s", flush=True)
        if baseline and "base_ab" in res:
            err = np.max(np.abs(np.asarray(out["mlp_full"])[:, ks_ab] - base_J)) / np.max(np.abs(base_J))
            print(f"    max rel. difference to torch: {err:.1e}; RATIO (a) baseline/ours = "
                  f"{res['base_ab'] / best:.1f}x", flush=True)
        del out
        run = lambda: jac.jacobian_sweep(model, prefix, x, 0, "resid_pre", families=("mlp",),
                                         stats=(), cumulative=False, full=("mlp",),
                                         mlp_method="autodiff", batch_size=bs, force=True)
        first, best, out = _timed(run, repeat=int(steady)) if args.autodiff else (0, 0, None)
        del out
        if args.autodiff:
            print(f"ours (a') autodiff jacfwd full matrices: {best:.2f}s (first {first:.2f}s)"
              + (f"; ratio {res['base_ab'] / best:.1f}x" if "base_ab" in res else ""), flush=True)
        # plain matmul of the same shape and count, same run
        A = jnp.asarray(rng.normal(size=(N, d, m)), jnp.float32)
        B = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
        mm = jax.jit(lambda A, B: A @ B)
        _timed(lambda: mm(A, B))
        _, tmm, _ = _timed(lambda: mm(A, B), repeat=2)
        rate_mm = N * 2.0 * d * d * m / tmm / 1e9
        res["ours_a_rate"] = flops_dense / res["ours_a"] / 1e9
        print(f"plain matmul [{N},{d},{m}]@[{m},{d}]: {rate_mm:.1f} GFLOP/s; ours (a) reaches "
              f"{100 * res['ours_a_rate'] / rate_mm:.0f}% of it", flush=True)
        del A, B

    # ------------------------------------------------------------------ (b) ours
    if "b" not in skip:
        run = lambda: jac.jacobian_sweep(model, prefix, x, 0, "resid_pre", families=("mlp",),
                                         stats=("fro",), cumulative=False, mlp_method="gram",
                                         batch_size=bs)
        first, best, out = _timed(run, repeat=int(steady))
        print(f"ours (b) Gram Frobenius norms, one pair incl. precomputation: {best:.2f}s "
              f"(first {first:.2f}s)", flush=True)
        if baseline and "base_ab" in res:
            err = np.max(np.abs(np.asarray(out["mlp_fro"])[:, ks_ab] - norms) / norms)
            print(f"    max rel. difference to torch norms: {err:.1e}; RATIO (b, one pair) = "
                  f"{res['base_ab'] / best:.1f}x", flush=True)
        tg0 = time.perf_counter()
        grams = _block(jac.mlp_grams_for(model))
        tg = time.perf_counter() - tg0
        toks = rng.integers(0, cfg.vocab_size, (args.pairs, 2))
        opts = jac.SweepOptions(families=("mlp",), stats=("fro",), cumulative=False,
                                mlp_method="gram", batch_size=bs)
        _block(jac.jacobian_sweep(model, prefix, path_for(1, 2), 0, "resid_pre", options=opts,
                                  grams=grams))  # compile
        t = time.perf_counter()
        for ta, tb in toks:
            o = jac.jacobian_sweep(model, prefix, path_for(int(ta), int(tb)), 0, "resid_pre",
                                   options=opts, grams=grams)
        _block(o)
        tp = time.perf_counter() - t
        per_pair = (tg + tp) / args.pairs
        print(f"ours (b) {args.pairs} pairs: Gram precomputation {tg:.2f}s once + {tp:.2f}s "
              f"= {per_pair * 1e3:.1f} ms per pair", flush=True)
        if "base_ab" in res:
            print(f"    RATIO (b, per pair over {args.pairs} pairs) = {res['base_ab'] / per_pair:.0f}x",
                  flush=True)

    # ------------------------------------------------------------------ (c)
    if "c" not in skip:
        run = lambda: jac.jacobian_sweep(model, prefix, x, 0, "resid_pre", families=(),
                                         stats=("fro",), cumulative=True, batch_size=bs)
        first, best, out = _timed(run, repeat=int(steady))
        flops_c = N * d * sum(2.0 * (12 * d * d) for _ in range(nL))  # tangent matmuls only
        print(f"ours (c) cumulative norms at all {nL} depths, {N} steps: {best:.2f}s (first "
              f"{first:.2f}s), ~{flops_c / best / 1e9:.1f} GFLOP/s on the tangent matmuls",
              flush=True)
        if baseline:
            ids = torch.tensor([list(ctx) + [0]])
            blocks = hf.transformer.h

            def f_final(v):
                box = {}

                def pre(mod, a):
                    h = a[0]
                    return (torch.cat([h[:, :-1], v[None, None]], 1),) + tuple(a[1:])

                def read(mod, a, o):
                    box["y"] = (o[0] if isinstance(o, tuple) else o)[0, -1]

                h1 = blocks[0].register_forward_pre_hook(pre)
                h2 = blocks[nL - 1].register_forward_hook(read)
                try:
                    hf.transformer(input_ids=ids, use_cache=False)
                finally:
                    h1.remove()
                    h2.remove()
                return box["y"]

            ks = np.linspace(0, N - 1, args.baseline_steps_c).astype(int)
            t = time.perf_counter()
            for k in ks:
                Jt = jacrev(f_final, chunk_size=128)(torch.from_numpy(np.array(x[k]))).detach()
                _ = torch.linalg.norm(Jt).item()
            tb = (time.perf_counter() - t) / len(ks) * N
            err = abs(torch.linalg.norm(Jt).item() - float(out["cumulative_fro"][-1, ks[-1]])) / \
                torch.linalg.norm(Jt).item()
            print(f"baseline (c) study, final depth only: {tb:.2f}s for {N} steps (timed "
                  f"{len(ks)} steps, scaled); rel. difference of the final-depth norm {err:.1e}; "
                  f"RATIO (c) baseline(1 depth)/ours(all depths) = {tb / best:.1f}x", flush=True)


if __name__ == "__main__":
    main()
