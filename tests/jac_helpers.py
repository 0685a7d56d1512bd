"""Shared helpers for the Jacobian tests and benchmarks: a path on a tiny model and the study's
way of computing Jacobians (torch.func.jacrev on transformers' PyTorch GPT-2 with hooks)."""

from __future__ import annotations

import numpy as np

import plateau_jax as pj
from plateau_jax.plateaus import paths


def path_inputs(model, context="The house was", a=" big", b=" in", n_steps=5, layer=0):
    """(prefix, x [n_steps, d]): the slerp path between the two endings' resid_post[layer]."""
    ctx = model.to_tokens(context)
    prefix = pj.run_prefix(model, ctx)
    ids = np.array([model.to_tokens(a)[0], model.to_tokens(b)[0]])
    e = pj.embed_last(model, prefix, ids)
    s = f"blocks.{layer}.hook_resid_post"
    _, rec = pj.continue_from(model, prefix, e, 0, site="resid_pre", sites=[s])
    x = paths.interpolate(rec[s][0], rec[s][1], paths.alpha_grid(n_steps))
    return prefix, x, ctx


class TorchGPT2:
    """transformers' GPT2LMHeadModel (eager attention) with hooks to feed the last position's
    residual stream at one layer and read one activation: the study's set-up."""

    def __init__(self, directory, context_ids, dtype="float32"):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.hf = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        self.hf = self.hf.to(self.dtype)
        self.ids = torch.tensor([list(np.asarray(context_ids)) + [0]])

    def blocks(self):
        return self.hf.transformer.h

    def mlp_fn(self, layer):
        blk = self.blocks()[layer]
        return lambda x: blk.mlp(blk.ln_2(x))

    def hooked_fn(self, entry_layer, read_layer, what):
        """x [d] fed as blocks.{entry_layer}.hook_resid_pre at the last position -> the last
        position's ``what`` ("attn_out" or "resid_post") of block ``read_layer``."""
        torch = self.torch
        blocks = self.blocks()

        def f(x):
            box = {}

            def pre_hook(mod, args):
                h = args[0]
                h = torch.cat([h[:, :-1], x[None, None].to(h.dtype)], dim=1)
                return (h,) + tuple(args[1:])

            def read_hook(mod, args, out):
                o = out[0] if isinstance(out, tuple) else out
                box["y"] = o[0, -1]

            target = blocks[read_layer].attn if what == "attn_out" else blocks[read_layer]
            h1 = blocks[entry_layer].register_forward_pre_hook(pre_hook)
            h2 = target.register_forward_hook(read_hook)
            try:
                self.hf.transformer(input_ids=self.ids, use_cache=False)
            finally:
                h1.remove()
                h2.remove()
            return box["y"]

        return f

    def jacrev(self, f, x, chunk_size=128):
        from torch.func import jacrev

        xt = self.torch.tensor(np.asarray(x), dtype=self.dtype)
        return jacrev(f, chunk_size=chunk_size)(xt).detach().numpy()


_CKPT = {}


def shared_checkpoint():
    """(directory, float32 model): one random tiny checkpoint per test session (creating one
    costs ~10-15 s, mostly Flax init), with weights x3 for sharper nonlinearities."""
    if "ckpt" not in _CKPT:
        import tempfile

        from plateau_jax import testing

        d = tempfile.mkdtemp(prefix="plateau_jac_ckpt_")
        _CKPT["ckpt"] = (d, testing.make_checkpoint(d, testing.tiny_config(), seed=3, scale=3.0))
    return _CKPT["ckpt"]


def to_float64(model):
    """A float64 copy of ``model`` (call with jax_enable_x64 on)."""
    import jax
    import jax.numpy as jnp

    return model.replace(params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                                       model.params))
