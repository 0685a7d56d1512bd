"""benchmarks.torch_reference, the study's way in PyTorch that the benchmarks time, computes what
plateau_jax computes: the one-step-at-a-time interpolation loop (activations, logits, MLP
Jacobian norms) and the full-stack Jacobian, on the same tiny checkpoint (float32)."""

import os
import sys

import numpy as np

import plateau_jax as pj
from plateau_jax.jacobians import sweep as jac
from plateau_jax.plateaus import interpolation, paths

sys.path.insert(0, os.path.dirname(__file__))

from benchmarks import torch_reference  # noqa: E402

N_STEPS = 4


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_study_loop_and_full_stack_match_plateau_jax(plateau_dir, plateau_model):
    d, model = plateau_dir, plateau_model
    ctx = model.to_tokens("The house was")
    ta, tb = int(model.to_tokens(" big")[0]), int(model.to_tokens(" in")[0])
    tm = torch_reference.TorchGPT2(d, ctx)
    ref = tm.study_loop(ta, tb, layer=0, n_steps=N_STEPS)

    prefix = pj.run_prefix(model, ctx)
    ends = interpolation.endpoint_activations(model, prefix, [ta, tb], [0])[0]
    a_ref, b_ref = (v.numpy() for v in tm.endpoints(ta, tb, 0))
    assert _rel(ends, np.stack([a_ref, b_ref])) < 1e-5
    alpha = paths.alpha_grid(N_STEPS)
    run = interpolation.interpolation_run(model, prefix, ends[0], ends[1], 0, alpha)
    assert _rel(run.logits, ref["logits"]) < 1e-4
    for name in ("attn_out", "resid_mid", "mlp_pre", "mlp_out", "resid_post"):
        ours = np.swapaxes(run.acts[name], 0, 1)  # [n, layers, X] as the reference
        assert _rel(ours, ref[name]) < 1e-4, name
    # the study's slerp (torch) and ours give the same path
    x_ref = np.stack([torch_reference.slerp(*tm.endpoints(ta, tb, 0), float(al)).numpy()
                      for al in alpha])
    assert _rel(run.x, x_ref) < 1e-5

    out = jac.jacobian_sweep(model, prefix, run.x, 0, families=("mlp",), mlp_method="gram",
                             cumulative=True, full=("cumulative",))
    assert _rel(out["mlp_fro"], ref["mlp_fro"]) < 1e-4
    k = N_STEPS // 2
    J = tm.jacrev(tm.full_stack_fn(0), run.x[k])
    assert _rel(out["cumulative_full"][-1, k], J) < 1e-4

    # the study's MLP loop on given activations (what bench_jacobians times)
    mids = {l: ref["resid_mid"][:, i] for i, l in enumerate(range(1, model.config.n_layer))}
    kept, norms = tm.mlp_jacobians(mids, [1, 2], [0, k])
    assert len(kept) == 4 and kept[0].shape == (model.config.d_model,) * 2
    np.testing.assert_allclose(norms, ref["mlp_fro"][:2][:, [0, k]], rtol=1e-6)


def test_sample_steps():
    assert list(torch_reference.sample_steps(50, 0)) == list(range(50))
    s = torch_reference.sample_steps(50, 3)
    assert list(s) == [0, 24, 49] or list(s) == [0, 25, 49]
    assert len(torch_reference.sample_steps(5, 10)) == 5
