"""Direction responses: base points x directions x step lengths per second, ours against the
obvious loop, on the same random GPT-2-small-sized weights in one run.

* baseline (the study's PyTorch style): transformers' ``GPT2LMHeadModel``, one perturbed forward
  at a time: the whole prompt runs, a forward pre-hook on block ``layer`` replaces the last
  position's ``resid_pre`` by ``x + t D u``, forward hooks keep every later block's output at the
  last position; the KL to the unperturbed output and the per-layer distances are computed per
  forward. Too slow to run in full: a random sample of ``--baseline_sample`` (base, direction,
  length) rows is timed and the per-row time extrapolated to all rows (said in the output).
* ours: :func:`plateau_jax.plateaus.directions.perturbation_responses`, one batched call (the
  prompts' contexts cached once per base point, every row one token through the rest of the
  model, KL and distances on the device).
* sensitive search: ``find_sensitive_directions`` for all base points in one batched optimisation
  against the baseline's loop over base points (torch autograd + Adam, the restarts of one base
  point batched), timed on ``--sensitive_sample`` base points and extrapolated.

Both sides use the same thread count (``--threads``: torch.set_num_threads and XLA's intra-op
threads, set before JAX starts); passes alternate (cold = with compilation, then warm repeats),
medians are reported with the load average. Usage (repo root)::

    python -m benchmarks.bench_directions              # 64 base x 5 types x 32 lengths, GPT-2 small
    python -m benchmarks.bench_directions --quick      # 4 layers, 16 base points, 8 lengths
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n_base", type=int, default=64)
    ap.add_argument("--n_lengths", type=int, default=32)
    ap.add_argument("--prompt_tokens", type=int, default=16, help="tokens per prompt")
    ap.add_argument("--layer", type=int, default=1, help="perturbed blocks.{layer}.hook_resid_pre")
    ap.add_argument("--reps", type=int, default=2, help="warm passes after the cold one")
    ap.add_argument("--baseline_sample", type=int, default=192)
    ap.add_argument("--batch_size", type=int, default=8, help="our base points per call")
    ap.add_argument("--sensitive_steps", type=int, default=10)
    ap.add_argument("--sensitive_restarts", type=int, default=4)
    ap.add_argument("--sensitive_sample", type=int, default=2)
    ap.add_argument("--skip_sensitive", action="store_true")
    return ap.parse_args()


ARGS = _args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
                           f" intra_op_parallelism_threads={ARGS.threads}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import plateau_jax  # noqa: E402
from plateau_jax.plateaus import directions as D  # noqa: E402
from plateau_jax.plateaus import reference as R  # noqa: E402

TYPES = ("real", "random", "matched", "cov_diff", "cov_sample")


def load():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def torch_model(model):
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(ARGS.threads)
    with tempfile.TemporaryDirectory() as d:
        plateau_jax.save_model(model, d)
        return GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()


class Baseline:
    """One perturbed forward at a time with hooks (TransformerLens style, in HF PyTorch)."""

    def __init__(self, tm, layer):
        import torch

        self.torch, self.tm, self.layer = torch, tm, layer
        self.x = None
        self.outs = []
        blocks = tm.transformer.h
        blocks[layer].register_forward_pre_hook(self._replace)
        for i in range(layer, len(blocks)):
            blocks[i].register_forward_hook(self._keep)

    def _keep(self, module, args, out):
        h = out if isinstance(out, self.torch.Tensor) else out[0]  # transformers versions differ
        self.outs.append(h[:, -1])

    def _replace(self, module, args):
        if self.x is None:
            return None
        h = args[0].clone()
        h[:, -1] = self.x
        return (h,) + tuple(args[1:])

    def run(self, ids, x=None):
        """Logits and later blocks' resid_post at the last position, x substituted."""
        self.outs, self.x = [], x
        logits = self.tm(ids).logits[:, -1]
        return logits, self.torch.stack(self.outs, 0)

    def row(self, ids, x, ref_lp, ref_resid):
        torch = self.torch
        with torch.no_grad():
            logits, resid = self.run(ids, x)
            lp = torch.log_softmax(logits.double(), -1)
            kl = torch.sum(ref_lp.exp() * (ref_lp - lp), -1)
            dist = torch.linalg.norm(resid - ref_resid, dim=-1)
        return float(kl[0]), dist[:, 0].numpy()


def main():
    torch_threads = ARGS.threads
    overrides = dict(n_layer=4) if ARGS.quick else {}
    n_base = 16 if ARGS.quick else ARGS.n_base
    n_lengths = 8 if ARGS.quick else ARGS.n_lengths
    config = plateau_jax.ModelConfig.preset("gpt2", **overrides)
    model = plateau_jax.init_model(config, seed=0)
    tm = torch_model(model)
    import torch

    rng = np.random.default_rng(0)
    T = ARGS.prompt_tokens
    prompts = [rng.integers(0, config.vocab_size, T).astype(np.int32) for _ in range(n_base)]
    ref_prompts = [rng.integers(0, config.vocab_size, T).astype(np.int32)
                   for _ in range(-(-(config.d_model + 64) // (T - 1)))]
    layer, site = ARGS.layer, "resid_pre"
    ref, _ = R.build_reference(model, ref_prompts, layer, site, positions="all")
    base = np.asarray(R.collect_activations(model, prompts, layer, site))
    key = jax.random.PRNGKey(0)
    F, mu, xb = (jnp.asarray(ref.gaussian_factor(), jnp.float32),
                 jnp.asarray(ref.mean, jnp.float32), jnp.asarray(base))
    k = jax.random.split(key, 5)
    dirs = np.concatenate([
        np.asarray(D.real_directions(k[0], xb, xb, 1, jnp.arange(n_base))[0]),
        np.asarray(D.random_directions(k[1], n_base, 1, config.d_model)),
        np.asarray(D.matched_directions(k[2], xb, mu, F, 1)),
        np.asarray(D.cov_diff_directions(k[3], mu, F, n_base, 1)),
        np.asarray(D.cov_sample_directions(k[4], mu, F, n_base, 1))], axis=1)
    lengths = D.length_grid(1.5, n_lengths)
    Dscale = ref.typical_distance
    rows = n_base * len(TYPES) * n_lengths
    print(f"GPT-2-small-sized random weights (n_layer={config.n_layer}, d={config.d_model}, "
          f"vocab={config.vocab_size}); {n_base} base points x {len(TYPES)} types x {n_lengths} "
          f"lengths = {rows} perturbed outputs; prompts of {T} tokens; blocks.{layer}.hook_{site}")
    print(f"threads: torch {torch.get_num_threads()} (set {torch_threads}), XLA intra-op "
          f"{ARGS.threads}; jax {jax.__version__} on {jax.devices()[0]}; torch {torch.__version__}")

    bl = Baseline(tm, layer)
    sample = rng.choice(rows, size=min(ARGS.baseline_sample, rows), replace=False)

    def baseline_pass():
        t0 = time.perf_counter()
        out = {}
        cache = {}
        for r in sample:
            b, m, t = np.unravel_index(r, (n_base, len(TYPES), n_lengths))
            ids = torch.tensor(prompts[b][None], dtype=torch.long)
            if b not in cache:  # the unperturbed forward of this base point (study: step 0)
                with torch.no_grad():
                    lg, rs = bl.run(ids)
                cache[b] = (torch.log_softmax(lg.double(), -1), rs)
            x = torch.tensor(base[b] + lengths[t] * Dscale * dirs[b, m], dtype=torch.float32)
            out[(b, m, t)] = bl.row(ids, x, *cache[b])
        per_row = (time.perf_counter() - t0) / len(sample)
        return per_row * rows, out

    def ours_pass():
        t0 = time.perf_counter()
        res = D.perturbation_responses(model, prompts, base, dirs, lengths, layer, site, Dscale,
                                       batch_size=ARGS.batch_size)
        return time.perf_counter() - t0, res

    times = {"baseline": [], "ours": []}
    print(f"{'pass':>5} {'baseline s (extrap.)':>21} {'ours s':>8} {'speed-up':>9} "
          f"{'rows/s ours':>12} {'max |KL diff|':>14}  load")
    for label in ["cold"] + ["warm"] * ARGS.reps:
        tb, bout = baseline_pass()
        to, res = ours_pass()
        diff = max(abs(res.kl[b, m, t] - v[0]) for (b, m, t), v in bout.items())
        ddiff = max(np.nanmax(np.abs(res.dist[b, m, t, layer:] - v[1])) for (b, m, t), v in
                    bout.items())
        if label == "warm":
            times["baseline"].append(tb)
            times["ours"].append(to)
        print(f"{label:>5} {tb:>21.1f} {to:>8.2f} {tb / to:>8.1f}x {rows / to:>12.0f} "
              f"{diff:>14.2e}  {load()} (max |dist diff| {ddiff:.1e})", flush=True)
    mb, mo = float(np.median(times["baseline"])), float(np.median(times["ours"]))
    print(f"warm medians: baseline {mb:.1f} s (extrapolated from {len(sample)} of {rows} "
          f"forwards), ours {mo:.2f} s -> {mb / mo:.1f}x; ours {rows / mo:.0f} "
          f"base x direction x length per second, baseline {rows / mb:.1f}")

    if ARGS.skip_sensitive:
        return
    R_, S_ = ARGS.sensitive_restarts, ARGS.sensitive_steps
    radius = 0.5 * Dscale

    def torch_search(b):
        ids = torch.tensor(np.repeat(prompts[b][None], R_, 0), dtype=torch.long)
        with torch.no_grad():
            lg, _ = bl.run(ids[:1])
            lp0 = torch.log_softmax(lg, -1)
        u = torch.randn(R_, config.d_model)
        u = (u / u.norm(dim=-1, keepdim=True)).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=0.05)
        xb_ = torch.tensor(base[b])
        for _ in range(S_):
            opt.zero_grad()
            lg, _ = bl.run(ids, xb_ + radius * u)
            lp = torch.log_softmax(lg, -1)
            obj = torch.sum(lp0.exp() * (lp0 - lp), -1)
            (-obj.sum()).backward()
            with torch.no_grad():
                u.grad -= (u.grad * u).sum(-1, keepdim=True) * u
            opt.step()
            with torch.no_grad():
                u /= u.norm(dim=-1, keepdim=True)
        return obj.detach()

    def baseline_sensitive():
        t0 = time.perf_counter()
        for b in range(ARGS.sensitive_sample):
            torch_search(b)
        return (time.perf_counter() - t0) / ARGS.sensitive_sample * n_base

    def ours_sensitive():
        t0 = time.perf_counter()
        D.find_sensitive_directions(model, prompts, base, layer, site, Dscale, length=0.5,
                                    restarts=R_, steps=S_, learning_rate=0.05,
                                    batch_size=n_base)
        return time.perf_counter() - t0

    st = {"baseline": [], "ours": []}
    print(f"sensitive search: {n_base} base points x {R_} restarts x {S_} Adam steps at t = 0.5 D "
          f"(ours: one batched jitted optimisation; baseline: a loop over base points, timed on "
          f"{ARGS.sensitive_sample} and extrapolated)")
    for label in ["cold"] + ["warm"] * ARGS.reps:
        tb = baseline_sensitive()
        to = ours_sensitive()
        if label == "warm":
            st["baseline"].append(tb)
            st["ours"].append(to)
        print(f"{label:>5} baseline {tb:8.1f} s  ours {to:7.2f} s  {tb / to:6.1f}x  {load()}",
              flush=True)
    mb, mo = float(np.median(st["baseline"])), float(np.median(st["ours"]))
    print(f"sensitive warm medians: baseline {mb:.1f} s, ours {mo:.2f} s -> {mb / mo:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
