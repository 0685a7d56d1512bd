"""Jacobian sweeps: finite differences (float64), torch.func.jacrev (the study's way), closed form,
Gram norms, cumulative/chain-rule identities, the study's block-0-twice defect, reductions."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax import jacobians as jac
from plateau_jax import mlp_jacobian, spectral, testing

sys.path.insert(0, os.path.dirname(__file__))
from jac_helpers import TorchGPT2, path_inputs  # noqa: E402

N_STEPS = 4


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("jac_ckpt"))
    # scale > 1: sharper nonlinearities than GPT-2's tiny init, so every term matters.
    model = testing.make_checkpoint(d, testing.tiny_config(), seed=3, scale=3.0)
    return d, model


@pytest.fixture(scope="module")
def f32(ckpt):
    d, model = ckpt
    prefix, x, ctx = path_inputs(model, n_steps=N_STEPS)
    out = jac.jacobian_sweep(model, prefix, x, 0, products=True, stats=("fro",),
                             full=("mlp", "attn", "layer", "cumulative", "product_mlp"))
    return model, prefix, x, ctx, {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture
def f64(ckpt):
    _, model = ckpt
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        m64 = model.replace(params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                                          model.params))
        prefix, x, _ = path_inputs(m64, n_steps=N_STEPS)
        out = jac.jacobian_sweep(m64, prefix, x, 0, full=("mlp", "attn", "layer", "cumulative"))
        out = {k: np.asarray(v) for k, v in out.items()}
        sites = [pj.site(l, s) for l in range(1, m64.config.n_layer)
                 for s in ("resid_pre", "resid_mid")]
        _, rec = pj.continue_from(m64, prefix, x, 0, sites=sites)
        yield m64, prefix, x, out, {k: np.asarray(v) for k, v in rec.items()}
    finally:
        jax.config.update("jax_enable_x64", old)


def _fd(model, prefix, x0, layer, site, read, eps=1e-5):
    """Central differences of continue_from (an independent code path) -> [d_out, d_in]."""
    d = x0.shape[-1]
    E = np.eye(d) * eps
    xs = np.concatenate([x0[None] + E, x0[None] - E])
    _, rec = pj.continue_from(model, prefix, xs, layer, site=site, sites=[read])
    y = np.asarray(rec[read])
    return ((y[:d] - y[d:]) / (2 * eps)).T


def test_every_jacobian_matches_central_differences_float64(f64):
    model, prefix, x, out, rec = f64
    assert out["mlp_full"].dtype == np.float64
    n = model.config.n_layer
    worst = 0.0
    for row, l in enumerate(range(1, n)):
        for k in (0, N_STEPS // 2, N_STEPS - 1):
            pre, mid = rec[pj.site(l, "resid_pre")][k], rec[pj.site(l, "resid_mid")][k]
            checks = {
                "mlp": _fd(model, prefix, mid, l, "resid_mid", pj.site(l, "mlp_out")),
                "attn": _fd(model, prefix, pre, l, "resid_pre", pj.site(l, "attn_out")),
                "layer": _fd(model, prefix, pre, l, "resid_pre", pj.site(l, "resid_post")),
                "cumulative": _fd(model, prefix, np.asarray(x[k]), 0, "resid_post",
                                  pj.site(l, "resid_post")),
            }
            for fam, fd in checks.items():
                err = _rel(out[f"{fam}_full"][row, k], fd)
                worst = max(worst, err)
                assert err < 1e-7, (fam, l, k, err)
    print(f"max relative error vs central FD (float64): {worst:.2e}")


def test_against_torch_jacrev_the_studys_way(ckpt, f32):
    d, _ = ckpt
    model, prefix, x, ctx, out = f32
    tm = TorchGPT2(d, ctx)
    sites = [pj.site(l, s) for l in range(1, model.config.n_layer) for s in ("resid_pre", "resid_mid")]
    _, rec = pj.continue_from(model, prefix, x, 0, sites=sites)
    worst = 0.0
    k = N_STEPS // 2
    for row, l in enumerate(range(1, model.config.n_layer)):
        pre, mid = np.asarray(rec[pj.site(l, "resid_pre")][k]), np.asarray(rec[pj.site(l, "resid_mid")][k])
        refs = {
            "mlp": tm.jacrev(tm.mlp_fn(l), mid),
            "attn": tm.jacrev(tm.hooked_fn(l, l, "attn_out"), pre),
            "layer": tm.jacrev(tm.hooked_fn(l, l, "resid_post"), pre),
            "cumulative": tm.jacrev(tm.hooked_fn(1, l, "resid_post"), np.asarray(x[k])),
        }
        for fam, ref in refs.items():
            err = _rel(out[f"{fam}_full"][row, k], ref)
            worst = max(worst, err)
            assert err < 2e-5, (fam, l, err)
    print(f"max relative error vs torch.func.jacrev (float32): {worst:.2e}")


@pytest.mark.parametrize("ln_mode", ["normal", "identity"])
def test_closed_form_and_gram_norms_match_autodiff(ckpt, ln_mode):
    _, model = ckpt
    cfg = testing.tiny_config(ln_mode=ln_mode)
    model = model.replace(config=cfg)
    prefix, x, _ = path_inputs(model, n_steps=N_STEPS)
    auto = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="autodiff",
                              cumulative=False, full=("mlp",))
    closed = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="closed",
                                cumulative=False, full=("mlp",))
    grams = jac.mlp_grams_for(model, range(1, cfg.n_layer))
    gram = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="gram",
                              cumulative=False, grams=grams)
    gram_inline = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="gram",
                                     cumulative=False)
    assert _rel(closed["mlp_full"], auto["mlp_full"]) < 1e-5
    dense_fro = np.linalg.norm(np.asarray(auto["mlp_full"]), axis=(-2, -1))
    assert _rel(gram["mlp_fro"], dense_fro) < 1e-4
    assert _rel(gram_inline["mlp_fro"], dense_fro) < 1e-4
    assert _rel(auto["mlp_fro"], dense_fro) < 1e-6
    print(ln_mode, "closed vs autodiff", _rel(closed["mlp_full"], auto["mlp_full"]),
          "gram vs dense", _rel(gram["mlp_fro"], dense_fro))


def test_gram_frobenius_at_larger_width():
    """d=256, m=1024 with GPT-2-like LayerNorm weights: float32 cancellation stays < 1e-4."""
    cfg = testing.tiny_config(n_embd=256, n_inner=1024, n_head=4, n_layer=1)
    model = pj.init_model(cfg, seed=1)
    bp = model.params["h"]["0"]
    key = jax.random.PRNGKey(0)
    bp = dict(bp, ln_2={"weight": 0.5 + jax.random.uniform(key, (256,)),
                        "bias": 0.1 * jax.random.normal(key, (256,))})
    h = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (6, 256)) + 1.0
    dense = np.linalg.norm(np.asarray(mlp_jacobian.mlp_jacobian(bp, cfg, h)), axis=(-2, -1))
    auto = jax.vmap(jax.jacfwd(lambda v: jac._mlp_out(bp, cfg, v)))(h)
    assert _rel(dense, np.linalg.norm(np.asarray(auto), axis=(-2, -1))) < 1e-5
    assert _rel(mlp_jacobian.mlp_frobenius_gram(bp, cfg, h), dense) < 1e-4


def test_cumulative_identities_and_no_double_block0(f32):
    model, prefix, x, _, out = f32
    cum, lay = out["cumulative_full"], out["layer_full"]
    # depth l0+1 (first row) is the layer Jacobian of block l0+1
    assert _rel(cum[0], lay[0]) < 1e-6
    # chain rule
    for r in range(1, cum.shape[0]):
        assert _rel(cum[r], lay[r] @ cum[r - 1]) < 1e-5
    # the MLP product leaves the skip path out: it is not the end-to-end derivative
    prod = out["product_mlp_full"]
    assert _rel(prod[1], out["mlp_full"][1] @ out["mlp_full"][0]) < 1e-5
    assert _rel(prod[-1], cum[-1]) > 1e-2
    # the study's "full residual" applied block 0 again to resid_post[0]; ours does not
    b0 = jac.family_fn(model, prefix, 0, "layer")
    g = jac.cumulative_fn(model, prefix, 0)
    k = N_STEPS // 2
    defect = np.asarray(jax.jacfwd(lambda v: g(b0(v))[-1])(x[k]))
    ours = np.asarray(jax.jacfwd(lambda v: g(v)[-1])(x[k]))
    assert _rel(ours, cum[-1, k]) < 1e-6
    assert _rel(defect, ours) > 1e-2
    assert out["cumulative_fro"].shape == (model.config.n_layer - 1, N_STEPS)


def test_reductions_and_matrix_free_estimates(f32):
    model, prefix, x, _, out = f32
    svd = jac.jacobian_sweep(model, prefix, x, 0, stats=("fro", "spec", "topk"), top_k=3,
                             cumulative=True, products=True)
    s = np.linalg.svd(out["mlp_full"], compute_uv=False)
    assert _rel(svd["mlp_topk"], s[..., :3]) < 1e-5
    assert _rel(svd["mlp_spec"], s[..., 0]) < 1e-5
    assert _rel(svd["cumulative_spec"], np.linalg.svd(out["cumulative_full"], compute_uv=False)[..., 0]) < 1e-5
    assert _rel(svd["product_mlp_fro"], out["product_mlp_fro"]) < 1e-5
    mf = jac.jacobian_sweep(model, prefix, x, 0, stats=("spec", "fro_hutch"), spec_method="power",
                            power_iters=200, probes=400, cumulative=False, seed=1)
    for fam in ("mlp", "attn", "layer"):
        exact_s = np.linalg.svd(out[f"{fam}_full"], compute_uv=False)[..., 0]
        assert _rel(mf[f"{fam}_spec"], exact_s) < 1e-3, fam
        fro = np.linalg.norm(out[f"{fam}_full"], axis=(-2, -1))
        z = np.abs(np.asarray(mf[f"{fam}_fro_hutch"]) - fro) / np.asarray(mf[f"{fam}_fro_hutch_se"])
        assert np.mean(z < 3) > 0.8 and np.all(z < 6), (fam, z)


def test_full_matrices_size_check():
    cfg = pj.GPT2Config.preset("gpt2-xl")
    need = jac.full_bytes(cfg, 50, 0, "resid_post", ("mlp",))
    assert need == 47 * 50 * 1600 ** 2 * 4
    with pytest.raises(jac.JacobianTooLargeError, match="force=True"):
        jac.check_full_size(cfg, 50, 0, "resid_post", ("mlp",), max_bytes=2 ** 30)
    assert jac.check_full_size(cfg, 50, 0, "resid_post", ("mlp",), max_bytes=2 ** 30, force=True) == need
    with pytest.raises(ValueError, match="family"):
        jac.SweepOptions(families=("mlp",), full=("attn",))
    with pytest.raises(ValueError, match="mlp_method"):
        jac.SweepOptions(mlp_method="magic")


def test_spectral_helpers_on_a_linear_map():
    A = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
    s = np.linalg.svd(np.asarray(A), compute_uv=False)
    f = lambda v: A @ v
    x = jnp.ones(5)
    assert abs(float(spectral.power_spectral_norm(f, x, jax.random.PRNGKey(1), 300)) - s[0]) < 1e-4 * s[0]
    red = spectral.reduce_dense(A, ("fro", "spec", "topk"), 2)
    np.testing.assert_allclose(red["topk"], s[:2], rtol=1e-5)
    np.testing.assert_allclose(red["fro"], np.sqrt((s ** 2).sum()), rtol=1e-5)
