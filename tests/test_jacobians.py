"""Jacobian sweeps in float64 on a tiny model: every Jacobian against central finite differences
and against torch.func.jacrev on transformers' PyTorch GPT-2 (the study's way), cumulative and
chain-rule identities, the study's block-0-twice defect, dense reductions, size checks."""

import os
import sys

import jax
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax.jacobians import sweep as jac
from plateau_jax.jacobians import spectral

sys.path.insert(0, os.path.dirname(__file__))
from jac_helpers import path_inputs, to_float64  # noqa: E402

from benchmarks.torch_reference import TorchGPT2  # noqa: E402

N_STEPS = 4
FULL = ("mlp", "attn", "layer", "cumulative", "product_mlp", "product_attn")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", autouse=True)
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="module")
def f64(plateau_dir, plateau_model):
    d, model = plateau_dir, plateau_model
    m64 = to_float64(model)
    prefix, x, ctx = path_inputs(m64, n_steps=N_STEPS)
    out = jac.jacobian_sweep(m64, prefix, x, 0, products=True, stats=("fro", "spec", "topk"),
                             top_k=3, full=FULL)
    out = {k: np.asarray(v) for k, v in out.items()}
    sites = [pj.site(l, s) for l in range(1, m64.config.n_layer) for s in ("resid_pre", "resid_mid")]
    _, rec = pj.continue_from(m64, prefix, x, 0, sites=sites)
    return dict(dir=d, model=m64, prefix=prefix, x=np.asarray(x), ctx=ctx, out=out,
                rec={k: np.asarray(v) for k, v in rec.items()})


def _fd(model, prefix, x0, layer, site, reads, eps=1e-5):
    """Central differences of continue_from (an independent code path).

    x0 [K, d] points -> {read: [K, d_out, d_in]}, all points and reads from one call."""
    K, d = x0.shape
    E = np.eye(d) * eps
    xs = np.concatenate([np.concatenate([p[None] + E, p[None] - E]) for p in x0])
    _, rec = pj.continue_from(model, prefix, xs, layer, site=site, sites=list(reads))
    out = {}
    for r in reads:
        y = np.asarray(rec[r]).reshape(K, 2, d, -1)
        out[r] = np.swapaxes((y[:, 0] - y[:, 1]) / (2 * eps), 1, 2)
    return out


def _worst_error(out, row, steps, refs, tol, layer):
    """Largest relative error of each family's full Jacobian at ``steps`` against ``refs``."""
    worst = 0.0
    for fam, ref in refs.items():
        err = _rel(out[f"{fam}_full"][row, steps], ref)
        assert err < tol, (fam, layer, err)
        worst = max(worst, err)
    return worst


def test_every_jacobian_matches_central_differences_float64(f64):
    model, prefix, x, out, rec = f64["model"], f64["prefix"], f64["x"], f64["out"], f64["rec"]
    assert out["mlp_full"].dtype == np.float64
    n = model.config.n_layer
    ks = [0, N_STEPS - 1]
    worst = 0.0
    cum = _fd(model, prefix, x[ks], 0, "resid_post", [pj.site(l, "resid_post") for l in range(1, n)])
    for row, l in enumerate(range(1, n)):
        pre, mid = rec[pj.site(l, "resid_pre")][ks], rec[pj.site(l, "resid_mid")][ks]
        fd_pre = _fd(model, prefix, pre, l, "resid_pre",
                     [pj.site(l, "attn_out"), pj.site(l, "resid_post")])
        checks = {
            "mlp": _fd(model, prefix, mid, l, "resid_mid", [pj.site(l, "mlp_out")])[pj.site(l, "mlp_out")],
            "attn": fd_pre[pj.site(l, "attn_out")],
            "layer": fd_pre[pj.site(l, "resid_post")],
            "cumulative": cum[pj.site(l, "resid_post")],
        }
        worst = max(worst, _worst_error(out, row, ks, checks, 1e-7, l))
    print(f"max relative error vs central FD (float64): {worst:.2e}")


@pytest.mark.slow
def test_against_torch_jacrev_the_studys_way(f64):
    model, x, out, rec = f64["model"], f64["x"], f64["out"], f64["rec"]
    tm = TorchGPT2(f64["dir"], f64["ctx"], dtype="float64")
    worst = 0.0
    k = N_STEPS // 2
    for row, l in enumerate(range(1, model.config.n_layer)):
        pre, mid = rec[pj.site(l, "resid_pre")][k], rec[pj.site(l, "resid_mid")][k]
        refs = {
            "mlp": tm.jacrev(tm.mlp_fn(l), mid),
            "attn": tm.jacrev(tm.hooked_fn(l, l, "attn_out"), pre),
            "layer": tm.jacrev(tm.hooked_fn(l, l, "resid_post"), pre),
            "cumulative": tm.jacrev(tm.hooked_fn(1, l, "resid_post"), x[k]),
        }
        worst = max(worst, _worst_error(out, row, k, refs, 1e-10, l))
    print(f"max relative error vs torch.func.jacrev (float64): {worst:.2e}")


@pytest.mark.slow
def test_cumulative_identities_and_no_double_block0(f64):
    model, prefix, x, out = f64["model"], f64["prefix"], f64["x"], f64["out"]
    cum, lay = out["cumulative_full"], out["layer_full"]
    assert out["cumulative_fro"].shape == (model.config.n_layer - 1, N_STEPS)
    # depth l0+1 (first row) is the layer Jacobian of block l0+1
    assert _rel(cum[0], lay[0]) < 1e-12
    # chain rule: cumulative[l] = layer[l] @ cumulative[l-1]
    for r in range(1, cum.shape[0]):
        assert _rel(cum[r], lay[r] @ cum[r - 1]) < 1e-12
    # the study's MLP/attention products leave the skip path out: not the end-to-end derivative
    for fam in ("mlp", "attn"):
        prod = out[f"product_{fam}_full"]
        assert _rel(prod[0], out[f"{fam}_full"][0]) < 1e-12
        assert _rel(prod[1], out[f"{fam}_full"][1] @ out[f"{fam}_full"][0]) < 1e-12
        assert _rel(prod[-1], cum[-1]) > 1e-2
    # the study's "full residual" applied block 0 again to resid_post[0]; ours does not
    b0 = jac.family_fn(model, prefix, 0, "layer")
    g = jac.cumulative_fn(model, prefix, 0)
    k = N_STEPS // 2
    defect = np.asarray(jax.jit(jax.jacfwd(lambda v: g(b0(v))[-1]))(x[k]))
    ours = np.asarray(jax.jit(jax.jacfwd(lambda v: g(v)[-1]))(x[k]))
    assert _rel(ours, cum[-1, k]) < 1e-12
    assert _rel(defect, ours) > 1e-2


def test_dense_reductions(f64):
    out = f64["out"]
    for name in ("mlp", "attn", "layer", "cumulative", "product_mlp", "product_attn"):
        J = out[f"{name}_full"]
        s = np.linalg.svd(J, compute_uv=False)
        assert _rel(out[f"{name}_fro"], np.linalg.norm(J, axis=(-2, -1))) < 1e-12, name
        assert _rel(out[f"{name}_spec"], s[..., 0]) < 1e-10, name
        assert _rel(out[f"{name}_topk"], s[..., :3]) < 1e-10, name


def test_full_matrices_size_check():
    cfg = pj.GPT2Config.preset("gpt2-xl")
    need = jac.full_bytes(cfg, 50, 0, "resid_post", ("mlp",))
    assert need == 47 * 50 * 1600 ** 2 * 4
    with pytest.raises(jac.JacobianTooLargeError, match="force=True"):
        jac.check_full_size(cfg, 50, 0, "resid_post", ("mlp",), max_bytes=2 ** 30)
    assert jac.check_full_size(cfg, 50, 0, "resid_post", ("mlp",), max_bytes=2 ** 30,
                               force=True) == need
    with pytest.raises(ValueError, match="family"):
        jac.SweepOptions(families=("mlp",), full=("attn",))
    with pytest.raises(ValueError, match="mlp_method"):
        jac.SweepOptions(mlp_method="magic")


def test_spectral_helpers_on_a_linear_map():
    A = np.random.default_rng(0).normal(size=(7, 5))
    s = np.linalg.svd(A, compute_uv=False)
    f = lambda v: A @ v
    x = np.ones(5)
    est = float(spectral.power_spectral_norm(f, x, jax.random.PRNGKey(1), 300))
    assert abs(est - s[0]) < 1e-8 * s[0]
    red = spectral.reduce_dense(A, ("fro", "spec", "topk"), 2)
    np.testing.assert_allclose(red["topk"], s[:2], rtol=1e-10)
    np.testing.assert_allclose(red["fro"], np.sqrt((s ** 2).sum()), rtol=1e-10)
