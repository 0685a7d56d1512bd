"""float32 accuracy of the fast MLP paths (closed form, Gram Frobenius norms) against autodiff,
in both LayerNorm modes, and of the matrix-free estimates (power iteration, Hutchinson)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax.jacobians import sweep as jac
from plateau_jax import testing
from plateau_jax.jacobians import mlp as mlp_jacobian
from plateau_jax.model.layers import mlp_part

sys.path.insert(0, os.path.dirname(__file__))
from jac_helpers import path_inputs  # noqa: E402

N_STEPS = 4


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("ln_mode", ["normal", pytest.param("identity", marks=pytest.mark.slow)])
def test_closed_form_and_gram_norms_match_autodiff(plateau_model, ln_mode):
    model = plateau_model
    cfg = testing.tiny_config(ln_mode=ln_mode)
    model = model.replace(config=cfg)
    prefix, x, _ = path_inputs(model, n_steps=N_STEPS)
    auto = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="autodiff",
                              cumulative=False, full=("mlp",))
    grams = jac.mlp_grams_for(model)
    # the first release's call, mlp_grams_for(model, layers), still gives every layer's stack
    np.testing.assert_array_equal(jac.mlp_grams_for(model, [1, 2])["M"], grams["M"])
    gram = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="gram",
                              cumulative=False, grams=grams)
    inline = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="gram",
                                cumulative=False)  # Gram matrices computed inside the call
    np.testing.assert_allclose(inline["mlp_fro"], gram["mlp_fro"], rtol=1e-5)
    _, rec = pj.continue_from(model, prefix, x, 0, sites=[pj.site(l, "resid_mid") for l in (1, 2)])
    dense_fro = np.linalg.norm(np.asarray(auto["mlp_full"]), axis=(-2, -1))
    worst = [0.0, 0.0]
    fast = jax.jit(lambda bp, h: (mlp_jacobian.mlp_jacobian(bp, cfg, h),
                                  mlp_jacobian.mlp_frobenius_gram(bp, cfg, h)))  # grams inline
    for row, l in enumerate((1, 2)):
        closed, inline = fast(model.block(l), rec[pj.site(l, "resid_mid")])
        e = _rel(closed, auto["mlp_full"][row])
        assert e < 1e-5
        worst[0] = max(worst[0], e)
        assert _rel(inline, dense_fro[row]) < 1e-4
    worst[1] = _rel(gram["mlp_fro"], dense_fro)
    assert worst[1] < 1e-4
    assert _rel(auto["mlp_fro"], dense_fro) < 1e-6
    print(f"{ln_mode}: closed vs autodiff {worst[0]:.1e}, gram vs dense {worst[1]:.1e}")


@pytest.mark.slow
def test_gram_frobenius_at_larger_width():
    """d=256, m=1024, non-trivial LayerNorm weights, off-centre inputs: float32 stays < 1e-4."""
    cfg = testing.tiny_config(d_model=256, d_mlp=1024, n_head=4, n_layer=1)
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    bp = {"ln2": {"w": 0.5 + jax.random.uniform(k[0], (256,)),
                  "b": 0.1 * jax.random.normal(k[1], (256,))},
          "mlp": {"W_in": 0.05 * jax.random.normal(k[2], (256, 1024)),
                  "b_in": 0.1 * jax.random.normal(k[3], (1024,)),
                  "W_out": 0.03 * jax.random.normal(k[4], (1024, 256)), "b_out": jnp.zeros(256)}}
    h = 3.0 * jax.random.normal(k[5], (6, 256)) + 1.0
    dense, auto, gram = jax.jit(lambda bp, h: (
        mlp_jacobian.mlp_jacobian(bp, cfg, h),
        jax.vmap(jax.jacfwd(lambda v: mlp_part(bp, v[None, None], cfg)[0, 0]))(h),
        mlp_jacobian.mlp_frobenius_gram(bp, cfg, h)))(bp, h)
    assert _rel(dense, auto) < 1e-5
    assert _rel(gram, np.linalg.norm(np.asarray(dense), axis=(-2, -1))) < 1e-4


@pytest.mark.slow
def test_matrix_free_power_and_hutchinson(plateau_model):
    model = plateau_model
    prefix, x, _ = path_inputs(model, n_steps=N_STEPS)
    # full matrices are returned for checking; spec still comes from power iteration
    mf = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp", "layer"), cumulative=False,
                            stats=("spec", "fro_hutch"), spec_method="power", power_iters=200,
                            probes=400, seed=1, full=("mlp", "layer"))
    dense = mf
    assert "mlp_fro" not in mf and "mlp_topk" not in mf
    for fam in ("mlp", "layer"):
        J = np.asarray(dense[f"{fam}_full"])
        assert _rel(mf[f"{fam}_spec"], np.linalg.svd(J, compute_uv=False)[..., 0]) < 1e-3, fam
        fro = np.linalg.norm(J, axis=(-2, -1))
        z = np.abs(np.asarray(mf[f"{fam}_fro_hutch"]) - fro) / np.asarray(mf[f"{fam}_fro_hutch_se"])
        assert np.mean(z < 3) > 0.8 and np.all(z < 6), (fam, z)
