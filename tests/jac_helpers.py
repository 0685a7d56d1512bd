"""Shared helpers for the Jacobian tests: a path on a tiny model, a float64 copy (the checkpoint
is conftest's ``plateau_dir`` / ``plateau_model``). The study's way of computing Jacobians
(torch.func.jacrev on transformers' PyTorch GPT-2 with hooks) is benchmarks.torch_reference,
shared with the benchmarks."""

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


def to_float64(model):
    """A float64 copy of ``model`` (call with jax_enable_x64 on)."""
    import jax
    import jax.numpy as jnp

    return model.replace(params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                                       model.params))
