"""THE PyTorch reference of the study's way, shared by the tests and every benchmark.

The study ran transformers' / TransformerLens' PyTorch GPT-2 one alpha step at a time: feed the
interpolated residual at the last position through a hook, read activations through hooks, and
for every step and layer compute a Jacobian with ``torch.func.jacrev(chunk_size=128)``, keeping
every matrix. This module does exactly that on transformers' ``GPT2LMHeadModel`` (eager
attention) built from one of our checkpoint directories (:func:`plateau_jax.save_model` writes
transformers' layout), on CPU or CUDA (TF32 off), in float32 or float64.

``plateau_jax`` never imports this module (nor torch). Usage as a script (the GPU suite's
baseline step; pure torch, no jax)::

    python -m benchmarks.torch_reference --model=DIR [--device=cuda] [--layer_steps=3]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

DTYPES = ("float32", "float64")
SITES = ("resid_pre", "resid_post")


def _torch():
    import torch

    return torch


def no_tf32():
    """float32 means float32: TF32 off for matmuls and convolutions (as the study's default)."""
    torch = _torch()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def load_hf(directory: str, dtype: str = "float32", device: str = "cpu"):
    """transformers' GPT2LMHeadModel (eager attention, eval mode) from a checkpoint directory."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    torch = _torch()
    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}.")
    no_tf32()
    model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    return model.to(device=device, dtype=getattr(torch, dtype))


def _out0(o):
    return o[0] if isinstance(o, tuple) else o


def slerp(a, b, alpha: float):
    """The study's path with the obtuse-angle fix (METHODS.md): the angle moves evenly, the norm
    linearly."""
    torch = _torch()
    na, nb = a.norm(), b.norm()
    ah, bh = a / na, b / nb
    th = torch.arccos(torch.clamp(ah @ bh, -1, 1))
    return ((torch.sin((1 - alpha) * th) * ah + torch.sin(alpha * th) * bh) / torch.sin(th)
            * ((1 - alpha) * na + alpha * nb))


class TorchGPT2:
    """transformers' GPT2LMHeadModel with hooks to feed the last position's residual stream at
    one layer and read activations: the study's set-up.

    ``context_ids`` is the shared context; the last position (its token is a placeholder, 0,
    unless given) is the one fed and read.
    """

    def __init__(self, directory: str, context_ids, dtype: str = "float32", device: str = "cpu"):
        torch = _torch()
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.hf = load_hf(directory, dtype, device)
        self.context = [int(t) for t in np.asarray(context_ids)]
        self.ids = self.sequence(0)

    @property
    def n_layer(self) -> int:
        return len(self.hf.transformer.h)

    def blocks(self):
        return self.hf.transformer.h

    def sequence(self, token: int):
        """[1, T] ids: the context and ``token`` at the last position."""
        return self.torch.tensor([self.context + [int(token)]], device=self.device)

    def tensor(self, x):
        return self.torch.tensor(np.array(x), dtype=self.dtype, device=self.device)

    # -- hooks ---------------------------------------------------------------------------

    def _feed_hook(self, layer: int, site: str, x):
        """A hook that replaces the last position of blocks.{layer}.hook_{site} by ``x``."""
        torch = self.torch
        blk = self.blocks()[layer]
        if site == "resid_pre":
            def pre(mod, args):
                h = args[0]
                return (torch.cat([h[:, :-1], x[None, None].to(h.dtype)], dim=1),) + tuple(args[1:])

            return blk.register_forward_pre_hook(pre)
        if site == "resid_post":
            def post(mod, args, out):
                h = _out0(out)
                h = torch.cat([h[:, :-1], x[None, None].to(h.dtype)], dim=1)
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            return blk.register_forward_hook(post)
        raise ValueError(f"site={site!r}: choose one of {SITES}.")

    def _read_hooks(self, layers: Iterable[int], box: dict):
        """Hooks storing the last position's resid_mid, mlp_pre, attn_out, mlp_out, resid_post
        of each layer into ``box[(name, layer)]``."""
        hooks = []
        for l in layers:
            blk = self.blocks()[l]

            def put(name, l=l):
                return lambda m, a, o: box.__setitem__((name, l), _out0(o)[0, -1])

            hooks.append(blk.ln_2.register_forward_pre_hook(
                lambda m, a, l=l: box.__setitem__(("resid_mid", l), a[0][0, -1])))
            hooks.append(blk.attn.register_forward_hook(put("attn_out")))
            hooks.append(blk.mlp.c_fc.register_forward_hook(put("mlp_pre")))
            hooks.append(blk.mlp.register_forward_hook(put("mlp_out")))
            hooks.append(blk.register_forward_hook(put("resid_post")))
        return hooks

    def run(self, token: int = 0, feed=None, read: Iterable[int] = ()):
        """One full forward of context + ``token``; ``feed = (layer, site, x)`` replaces the last
        position there. Returns (last-position logits, {(name, layer): activation})."""
        box: dict = {}
        hooks = self._read_hooks(read, box)
        if feed is not None:
            hooks.append(self._feed_hook(*feed))
        try:
            logits = self.hf(self.sequence(token)).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        return logits, box

    # -- single-token functions (what jacrev differentiates) -----------------------------

    def mlp_fn(self, layer: int):
        """resid_mid [d] -> mlp_out [d] of block ``layer`` (ln_2 included)."""
        blk = self.blocks()[layer]
        return lambda x: blk.mlp(blk.ln_2(x))

    def hooked_fn(self, entry_layer: int, read_layer: int, what: str, site: str = "resid_pre"):
        """x [d] fed as blocks.{entry_layer}.hook_{site} at the last position -> the last
        position's ``what`` ("attn_out" or "resid_post") of block ``read_layer``, through the
        whole HF model (context included, as TransformerLens' run_with_hooks does)."""
        blocks = self.blocks()
        if what not in ("attn_out", "resid_post"):
            raise ValueError(f"what={what!r}: 'attn_out' or 'resid_post'.")

        def f(x):
            box = {}

            def read(mod, args, out):
                box["y"] = _out0(out)[0, -1]

            target = blocks[read_layer].attn if what == "attn_out" else blocks[read_layer]
            h1 = self._feed_hook(entry_layer, site, x)
            h2 = target.register_forward_hook(read)
            try:
                self.hf.transformer(input_ids=self.ids, use_cache=False)
            finally:
                h1.remove()
                h2.remove()
            return box["y"]

        return f

    def full_stack_fn(self, layer: int = 0, site: str = "resid_post"):
        """x = blocks.{layer}.hook_{site} -> resid_post of the last block (the study's "full
        residual" Jacobian d resid_post[last] / d resid_post[0], without its block-0-twice
        defect)."""
        entry = layer + 1 if site == "resid_post" else layer
        return self.hooked_fn(entry, self.n_layer - 1, "resid_post")

    # -- Jacobians -----------------------------------------------------------------------

    def jacobian(self, f, x, chunk_size: int = 128):
        """``torch.func.jacrev(f, chunk_size)`` at ``x``: a [d_out, d_in] tensor on the device."""
        from torch.func import jacrev

        xt = x if isinstance(x, self.torch.Tensor) else self.tensor(x)
        return jacrev(f, chunk_size=chunk_size)(xt).detach()

    def jacrev(self, f, x, chunk_size: int = 128) -> np.ndarray:
        """:meth:`jacobian` as a numpy array."""
        return self.jacobian(f, x, chunk_size).cpu().numpy()

    def mlp_jacobians(self, mids, layers: Sequence[int], steps: Sequence[int], keep: bool = True):
        """The study's loop: for each layer and step, jacrev of the MLP at ``mids[layer][step]``
        (resid_mid [d]); returns (list of kept matrices (the study kept every one), Frobenius
        norms [len(layers), len(steps)])."""
        kept, norms = [], np.zeros((len(layers), len(steps)))
        for i, l in enumerate(layers):
            f = self.mlp_fn(l)
            for j, k in enumerate(steps):
                J = self.jacobian(f, mids[l][k])
                if keep:
                    kept.append(J)
                norms[i, j] = float(self.torch.linalg.norm(J))
        return kept, norms

    # -- the study's interpolation loop --------------------------------------------------

    def endpoints(self, token_a: int, token_b: int, layer: int, site: str = "resid_post"):
        """The last position's blocks.{layer}.hook_{site} of context + each token."""
        out = []
        with self.torch.no_grad():
            for tok in (token_a, token_b):
                box = {}
                if site == "resid_post":
                    h = self.blocks()[layer].register_forward_hook(
                        lambda m, a, o: box.__setitem__("x", _out0(o)[0, -1].clone()))
                else:
                    h = self.blocks()[layer].register_forward_pre_hook(
                        lambda m, a: box.__setitem__("x", a[0][0, -1].clone()))
                try:
                    self.hf(self.sequence(tok))
                finally:
                    h.remove()
                out.append(box["x"])
        return out

    def study_loop(self, token_a: int, token_b: int, layer: int, n_steps: int,
                   steps: Optional[Sequence[int]] = None, jacobians: bool = True,
                   site: str = "resid_post") -> Dict[str, np.ndarray]:
        """The study's one-alpha-step-at-a-time loop at ``layer``: endpoints, then per step a full
        forward with the slerp value fed in, recording every later layer's activations and the
        logits, and (``jacobians``) every later layer's MLP Jacobian by jacrev and its Frobenius
        norm. ``steps`` (default all) are the step indices run, for timing a sample.

        Returns {"logits": [S, V], "<name>": [S, n_later, d or m], "mlp_fro": [n_later, S]}.
        """
        torch = self.torch
        steps = list(range(n_steps)) if steps is None else list(steps)
        alphas = np.linspace(0.0, 1.0, n_steps)
        a, b = self.endpoints(token_a, token_b, layer, site)
        first = layer + 1 if site == "resid_post" else layer
        later = list(range(first, self.n_layer))
        rec: Dict[str, List] = {"logits": []}
        fro = np.zeros((len(later), len(steps)))
        for j, k in enumerate(steps):
            x = slerp(a, b, float(alphas[k]))
            with torch.no_grad():
                logits, box = self.run(token_a, feed=(layer, site, x), read=later)
            rec["logits"].append(logits)
            for name in ("attn_out", "resid_mid", "mlp_pre", "mlp_out", "resid_post"):
                rec.setdefault(name, []).append(torch.stack([box[(name, l)] for l in later]))
            if jacobians:
                for i, l in enumerate(later):
                    J = self.jacobian(self.mlp_fn(l), box[("resid_mid", l)])
                    fro[i, j] = float(torch.linalg.norm(J))
        out = {k: torch.stack(v).detach().cpu().numpy() for k, v in rec.items()}
        if jacobians:
            out["mlp_fro"] = fro
        return out


# ----------------------------------------------------------------------------- script

def sample_steps(n: int, k: int) -> np.ndarray:
    """``k`` step indices spread over ``range(n)`` (all when ``k`` is 0 or >= n)."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _sync(torch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_study_jacobians(directory: str, device: str = "cpu", n_steps: int = 50,
                         layer_steps: int = 3, stack_steps: int = 1, layers: Optional[int] = None,
                         context: Sequence[int] = (464, 2156, 373), tokens=(1263, 287)) -> dict:
    """The study's Jacobian costs on ``device``, each per-step loop timed on a sample of steps
    and scaled linearly: MLP Jacobians per layer-step (all later layers x ``n_steps``) and the
    full-stack Jacobian per step. Pure torch (the GPU suite runs it in its own process)."""
    torch = _torch()
    t0 = time.perf_counter()
    tm = TorchGPT2(directory, context, device=device)
    load_s = time.perf_counter() - t0
    L = tm.n_layer
    later = list(range(1, L))[: layers or None]
    if not later:
        raise ValueError(f"a {L}-layer model has no layer after blocks.0.hook_resid_post.")
    out = {"device": str(tm.device), "torch": torch.__version__, "n_layer": L, "n_steps": n_steps,
           "load_s": load_s, "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    a, b = tm.endpoints(tokens[0], tokens[1], 0)
    alphas = np.linspace(0, 1, n_steps)

    # MLP Jacobians: the study's loop, on a sample of steps (first call of each side = cold)
    ks = sample_steps(n_steps, layer_steps)
    mids = {}
    with torch.no_grad():
        for k in ks:
            _, box = tm.run(tokens[0], feed=(0, "resid_post", slerp(a, b, float(alphas[k]))),
                            read=later)
            for l in later:
                mids.setdefault(l, {})[k] = box[("resid_mid", l)]
    f = tm.mlp_fn(later[0])
    _sync(torch)
    t = time.perf_counter()
    tm.jacobian(f, mids[later[0]][ks[0]])
    _sync(torch)
    out["mlp_first_call_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, norms = tm.mlp_jacobians(mids, later, ks)
    _sync(torch)
    dt = time.perf_counter() - t
    out["mlp_per_layer_step_s"] = dt / (len(later) * len(ks))
    out["mlp_all_s"] = out["mlp_per_layer_step_s"] * len(later) * n_steps
    out["mlp_sampled"] = f"{len(ks)} of {n_steps} steps x {len(later)} layers, scaled linearly"

    # full-stack Jacobian d resid_post[last] / d resid_post[0] per step
    ks2 = sample_steps(n_steps, stack_steps)
    g = tm.full_stack_fn(0)
    times = []
    for k in ks2:
        x = slerp(a, b, float(alphas[k]))
        _sync(torch)
        t = time.perf_counter()
        J = tm.jacobian(g, x)
        float(torch.linalg.norm(J))
        _sync(torch)
        times.append(time.perf_counter() - t)
    out["stack_per_step_s"] = float(np.median(times))
    out["stack_all_s"] = out["stack_per_step_s"] * n_steps
    out["stack_sampled"] = f"{len(ks2)} of {n_steps} steps, scaled linearly"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (transformers' layout)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layer_steps", type=int, default=3, help="steps timed for MLP Jacobians")
    ap.add_argument("--stack_steps", type=int, default=1, help="steps timed for the full stack")
    ap.add_argument("--layers", type=int, default=0, help="only the first N later layers (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args(argv)
    torch = _torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    res = time_study_jacobians(args.model, args.device, args.steps, args.layer_steps,
                               args.stack_steps, args.layers or None)
    print(f"[torch study loop] {res['device']}, torch {res['torch']}, TF32 {res['tf32']}: MLP "
          f"Jacobians {res['mlp_per_layer_step_s'] * 1e3:.1f} ms per layer-step -> "
          f"{res['mlp_all_s']:.1f} s per pair ({res['mlp_sampled']}); full-stack Jacobian "
          f"{res['stack_per_step_s'] * 1e3:.0f} ms per step -> {res['stack_all_s']:.1f} s per "
          f"pair ({res['stack_sampled']})", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
