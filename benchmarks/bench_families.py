r"""Pythia- and Llama-sized random models: interpolation and MLP-Jacobian sweeps, the study's way
in PyTorch against plateau_jax, on the same weights, in one process.

    python -m benchmarks.bench_families                         # both models, the defaults
    python -m benchmarks.bench_families --models=pythia-160m --steps=8 --reps=3

Models (random weights, GPT-2's init): ``pythia-160m`` (GPT-NeoX: d 768, 12 layers, 12 heads,
d_mlp 3072, rotary on 16 of 64 head dims, parallel residual, vocab 50304) and ``smollm-135m``
(Llama-style: d 576, 30 layers, 9 query / 3 key-value heads, SwiGLU d_mlp 1536, tied, vocab
49152). Our params are written with ``save_model`` and read by transformers
(``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``, eager attention, float32), so both sides run the
same function; the largest differences are printed.

Workloads (``--pairs`` pairs x ``--steps`` alpha steps, random context of ``--context`` tokens):

* interp: interpolation at ``blocks.L.hook_resid_post`` for every L in ``--interp_layers``,
  recording attn_out, mlp_out and resid_post of every later layer and the logits. Study: one
  forward of context + token per pair, layer and alpha step, with a forward hook replacing
  layer L's output at the last position and hooks recording the later layers (the study's
  ``run_with_hooks`` loop); endpoints from one hooked forward per prompt. Ours: ``run_prefix``
  once, ``endpoint_activations`` for every layer in one call, one ``interpolation_run`` per
  layer (every default component of every later layer).
* jac (a): full MLP Jacobians ``d mlp_out / d (MLP input)`` of every layer after
  ``blocks.0.hook_resid_post`` at every step. Study: per layer and step
  ``torch.func.jacrev(chunk_size=128)`` of ``mlp(post_attention_layernorm(x))`` at the MLP
  input (given for free), timed on ``--jac_baseline_steps`` steps per layer and scaled linearly.
  Ours: ``jacobian_sweep(families=("mlp",), mlp_method="closed", full=("mlp",))``, end to end
  from the path.
* jac (b): their Frobenius norms. Study: as (a) plus ``torch.linalg.norm``. Ours: Gram identity
  (``mlp_method="gram"``), including the per-layer Gram precomputation; and per pair when the
  Gram matrices are computed once and shared by many pairs (``grams=mlp_grams_for(model)``).

Timing: ``torch.set_num_threads(T)``, XLA's CPU thread pool (``XLA_FLAGS``) and the process's CPU
affinity all pinned to the same T = ``--threads`` CPUs. Repeats interleave (study, then ours, per
workload); the first is "cold" (ours includes XLA compilation, torch its first calls), the
others "warm" (medians). The load average is printed with every repeat. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _pin(threads: int) -> None:
    """Pins this process, torch and XLA to ``threads`` CPUs (before jax/torch are imported)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               f"true intra_op_parallelism_threads={threads}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


SIZES = {
    "pythia-160m": ("gpt_neox", dict(vocab_size=50304, d_model=768, n_layer=12, n_head=12,
                                     d_mlp=3072, rotary_dim=16)),
    "smollm-135m": ("llama", dict(vocab_size=49152, d_model=576, n_layer=30, n_head=9,
                                  n_kv_head=3, d_mlp=1536, tie_embeddings=True, norm_eps=1e-5)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pythia-160m,smollm-135m")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--context", type=int, default=4, help="context length in tokens")
    ap.add_argument("--interp_layers", default="0,3,6", help="interpolation layers (interp)")
    ap.add_argument("--jac_baseline_steps", type=int, default=2,
                    help="steps per layer on which the jacrev baseline is timed (scaled to --steps)")
    ap.add_argument("--reps", type=int, default=2, help="repeats: 1 cold + (reps - 1) warm")
    ap.add_argument("--skip", default="", help="comma list of workloads to skip: interp,jac")
    ap.add_argument("--n_layer", type=int, default=None, help="override the depth (quick checks)")
    args = ap.parse_args()
    _pin(args.threads)

    import tempfile

    import jax
    import numpy as np
    import torch
    import transformers

    import plateau_jax as pj
    from plateau_jax.jacobians import sweep as jac
    from plateau_jax.model import sites as sites_lib
    from plateau_jax.plateaus import interpolation, paths

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# {args.threads} threads (torch {torch.__version__}: {torch.get_num_threads()}; XLA "
          f"intra-op {args.threads}; affinity {sorted(os.sched_getaffinity(0))}); jax "
          f"{jax.__version__} on {jax.devices()[0].platform}; transformers {transformers.__version__}")
    print(f"# {args.pairs} pair(s) x {args.steps} steps, context {args.context} tokens, "
          f"{args.reps} repeat(s) (first = cold)")
    rng = np.random.default_rng(0)
    alpha = paths.alpha_grid(args.steps)

    def load():
        return "load average %.2f %.2f %.2f" % os.getloadavg()

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        jax.tree_util.tree_map(lambda a: getattr(a, "block_until_ready", lambda: a)(), out)
        return time.perf_counter() - t, out

    for name in args.models.split(","):
        family, kw = SIZES[name]
        kw = {**kw, **({"n_layer": args.n_layer} if args.n_layer else {})}
        cfg = getattr(pj.ModelConfig, family)(n_positions=2048, **kw)
        model = pj.init_model(cfg, seed=0)
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(model.params))
        d = tempfile.mkdtemp(prefix=f"bench_{name}_")
        pj.save_model(model, d)
        hf_cls = {"gpt_neox": transformers.GPTNeoXForCausalLM,
                  "llama": transformers.LlamaForCausalLM}[family]
        hf = hf_cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
        layers_t = (hf.gpt_neox if family == "gpt_neox" else hf.model).layers
        attn_t = lambda blk: blk.attention if family == "gpt_neox" else blk.self_attn
        L = cfg.n_layer
        ctx = rng.integers(0, cfg.vocab_size, args.context).astype(np.int32)
        tokens = rng.integers(0, cfg.vocab_size, (args.pairs, 2)).astype(np.int32)
        interp_layers = [int(l) for l in args.interp_layers.split(",") if int(l) < L - 1]
        print(f"\n## {name}: {family}, {n_params / 1e6:.0f}M params, d={cfg.d_model}, L={L}, "
              f"d_mlp={cfg.d_mlp}, H={cfg.n_head}/{cfg.n_kv_head}; {load()}")

        # ------------------------------------------------------------------ the study's way
        def hooked(ids, layer=None, x=None, record=()):
            """One forward; replaces layer ``layer``'s output at the last position by ``x``;
            returns (last-position logits, {(l, what): tensor}) for l in ``record``."""
            rec, hooks = {}, []
            if layer is not None:
                def put(m, a, o):
                    h = o[0] if isinstance(o, tuple) else o
                    h = torch.cat([h[:, :-1], x[None, None]], dim=1)
                    return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
                hooks.append(layers_t[layer].register_forward_hook(put))
            for l in record:
                blk = layers_t[l]
                for what, mod in (("attn_out", attn_t(blk)), ("mlp_out", blk.mlp),
                                  ("resid_post", blk)):
                    hooks.append(mod.register_forward_hook(
                        lambda m, a, o, k=(l, what): rec.__setitem__(
                            k, (o[0] if isinstance(o, tuple) else o)[0, -1])))
            try:
                with torch.no_grad():
                    logits = hf(torch.tensor(ids[None], dtype=torch.long)).logits[0, -1]
            finally:
                for h in hooks:
                    h.remove()
            return logits, rec

        def study_interp():
            out = {}
            for p in range(args.pairs):
                ids = [np.append(ctx, t) for t in tokens[p]]
                ends = [hooked(i, record=interp_layers)[1] for i in ids]
                for layer in interp_layers:
                    a, b = (e[(layer, "resid_post")].numpy() for e in ends)
                    xs = torch.tensor(np.asarray(paths.interpolate(a, b, alpha)))
                    later = range(layer + 1, L)
                    out[p, layer] = torch.stack([hooked(ids[0], layer, x, later)[0] for x in xs])
            return out

        def ours_interp():
            prefix = pj.run_prefix(model, ctx)
            ends = interpolation.endpoint_activations(model, prefix, tokens.ravel(), interp_layers)
            ends = ends.reshape(len(interp_layers), args.pairs, 2, -1)
            out = {}
            for j, layer in enumerate(interp_layers):
                run = interpolation.interpolation_run(model, prefix, ends[j, :, 0], ends[j, :, 1],
                                                      layer, alpha, check_finite=False)
                out[layer] = (run.logits, run.acts)
            return out

        # ------------------------------------------------------------------ Jacobians
        mlp_in = sites_lib.mlp_input(cfg)
        prefix = pj.run_prefix(model, ctx)
        e = interpolation.endpoint_activations(model, prefix, tokens[0], [0])[0]
        x_path = paths.interpolate(e[0], e[1], alpha)
        _, rec = pj.continue_from(model, prefix, x_path, 0,
                                  sites=[pj.site_name(l, mlp_in) for l in range(1, L)])
        h_in = {l: torch.tensor(np.asarray(rec[pj.site_name(l, mlp_in)])) for l in range(1, L)}
        sample = np.linspace(0, args.steps - 1, args.jac_baseline_steps).round().astype(int)

        def study_jac():
            from torch.func import jacrev
            out = {}
            for l in range(1, L):
                blk = layers_t[l]
                f = lambda v, blk=blk: blk.mlp(blk.post_attention_layernorm(v))
                for k in sample:
                    J = jacrev(f, chunk_size=128)(h_in[l][k]).detach()
                    out[l, k] = (J.detach().numpy(), float(torch.linalg.norm(J)))
            return out

        def ours_jac_full():
            return jac.jacobian_sweep(model, prefix, x_path, 0, families=("mlp",),
                                      mlp_method="closed", cumulative=False, full=("mlp",))

        def ours_jac_fro(grams=None):
            grams = jac.mlp_grams_for(model) if grams is None else grams
            return jac.jacobian_sweep(model, prefix, x_path, 0, families=("mlp",),
                                      mlp_method="gram", cumulative=False, grams=grams)

        shared_grams = None

        times = {}
        for rep in range(args.reps):
            label = "cold" if rep == 0 else "warm"
            if "interp" not in skip:
                ts, ref = timed(study_interp)
                to, got = timed(ours_interp)
                diff = max(float(np.abs(np.asarray(got[l][0]).reshape(args.pairs, args.steps, -1)[p]
                                        - ref[p, l].numpy()).max())
                           for p, l in ref)
                times.setdefault("interp", []).append((ts, to))
                print(f"interp {label}: study {ts:8.2f} s  ours {to:7.2f} s  ratio {ts / to:6.1f}x  "
                      f"max |logit diff| {diff:.1e}  ({load()})", flush=True)
            if "jac" not in skip:
                tsj, ref = timed(study_jac)
                scale = args.steps / len(sample)
                tsj *= scale
                ta, full = timed(ours_jac_full)
                tb, fro = timed(ours_jac_fro)
                if shared_grams is None:
                    shared_grams = jax.block_until_ready(jac.mlp_grams_for(model))
                tp, _ = timed(lambda: ours_jac_fro(shared_grams))
                full, fro = np.asarray(full["mlp_full"]), np.asarray(fro["mlp_fro"])
                ea = max(float(np.abs(full[l - 1, k] - J).max() / np.abs(J).max())
                         for (l, k), (J, _) in ref.items())
                eb = max(abs(float(fro[l - 1, k]) - n) / n for (l, k), (_, n) in ref.items())
                times.setdefault("jac_a", []).append((tsj, ta))
                times.setdefault("jac_b", []).append((tsj, tb))
                times.setdefault("jac_b_shared", []).append((tsj, tp))
                print(f"jac {label}: study {tsj:8.2f} s (timed {len(sample)} of {args.steps} steps "
                      f"per layer, scaled)  (a) full closed form {ta:7.2f} s = {tsj / ta:6.1f}x "
                      f"(max rel diff {ea:.1e})  (b) Gram norms {tb:7.2f} s = {tsj / tb:6.1f}x "
                      f"(max rel diff {eb:.1e}); (b) with Gram matrices shared across pairs "
                      f"{tp:7.2f} s per pair = {tsj / tp:6.1f}x  ({load()})", flush=True)
        for key, vals in times.items():
            cold = vals[0][0] / vals[0][1]
            warm = [s / o for s, o in vals[1:]]
            warm_txt = f"warm median {np.median(warm):.1f}x over {len(warm)}" if warm else "no warm"
            print(f"SUMMARY {name} {key}: cold {cold:.1f}x, {warm_txt}")
        del hf, model
        import shutil
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
