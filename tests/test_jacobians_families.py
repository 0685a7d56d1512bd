"""MLP Jacobians of every norm and MLP kind (LayerNorm/RMSNorm x plain/SwiGLU x normal/identity):
the closed form and the Gram-identity Frobenius norms against jax autodiff, torch.func.jacrev on
transformers' Llama and GPT-NeoX MLPs, and finite differences through the whole sweep (the MLP
of a parallel-residual block reads resid_pre)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import plateau_jax as pj
from plateau_jax import testing
from plateau_jax.jacobians import mlp as mlp_jacobian
from plateau_jax.jacobians import sweep as jac
from plateau_jax.model.layers import mlp_part
from conftest import to_numpy, torch_causal_lm
from jac_helpers import to_float64
from test_parity_families import CONFIGS


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _random_block(cfg, seed):
    """Block 0's params with every leaf random: norm weights around 1, biases around 0, weight
    matrices N(0, 0.2) (GPT-2's N(0, 0.02) x10: about 1 / sqrt(d_model) for these widths)."""
    return testing.make_checkpoint(None, cfg, seed=seed, scale=10.0, randomize_norms=True).block(0)


slow = pytest.mark.slow
FAST_CASE = ("rmsnorm", True, "normal")  # Llama's; the fast suite skips its float64 re-run
CASES = [pytest.param(norm, gated, mode, marks=() if (norm, gated, mode) == FAST_CASE else slow,
                      id=f"{norm}-{'swiglu' if gated else 'plain'}-{mode}")
         for norm in ("layernorm", "rmsnorm") for gated in (False, True)
         for mode in ("normal", "identity")]


@pytest.mark.parametrize("norm,gated,ln_mode", CASES)
def test_closed_form_and_gram_norms_equal_autodiff(norm, gated, ln_mode):
    cfg = testing.tiny_llama_config(norm=norm, gated_mlp=gated, ln_mode=ln_mode, n_layer=1,
                                    d_model=24, d_mlp=40, mlp_bias=True,
                                    act="silu" if gated else "gelu")
    bp = _random_block(cfg, seed=len(norm) + gated)
    h = 2.0 * jax.random.normal(jax.random.PRNGKey(9), (5, cfg.d_model)) + 0.7

    def all_three(bp, h):
        auto = jax.vmap(jax.jacfwd(lambda v: mlp_part(bp, v[None, None], cfg)[0, 0]))(h)
        return (mlp_jacobian.mlp_jacobian(bp, cfg, h), auto,
                mlp_jacobian.mlp_frobenius_gram(bp, cfg, h))

    closed, auto, gram = jax.jit(all_three)(bp, h)
    dense_fro = np.linalg.norm(np.asarray(auto, np.float64), axis=(-2, -1))
    assert _rel(closed, auto) < 1e-5
    assert _rel(gram, dense_fro) < 1e-4
    grams = mlp_jacobian.mlp_grams(bp, cfg)
    assert grams["M"].shape == ((3,) if gated else ()) + (cfg.d_mlp, cfg.d_mlp)
    assert float(np.min(dense_fro)) > 0.1  # a Jacobian worth comparing
    if (norm, gated, ln_mode) == FAST_CASE:
        return
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:  # float64: the identities are exact, not approximately true
        b64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), bp)
        c64, a64, g64 = jax.jit(all_three)(b64, jnp.asarray(h, jnp.float64))
        assert c64.dtype == jnp.float64
        assert _rel(c64, a64) < 1e-12
        assert _rel(g64, np.linalg.norm(np.asarray(a64), axis=(-2, -1))) < 1e-12
    finally:
        jax.config.update("jax_enable_x64", old)


@slow
@pytest.mark.parametrize("name", ["llama_mqa_biases_head_dim_tied", "neox_parallel_quarter_rotary"])
def test_closed_form_and_gram_norms_equal_torch_jacrev(tmp_path, name):
    """transformers' MLP with its post-attention norm, differentiated by torch.func.jacrev in
    float64 (the study's way), against ours in float32."""
    from torch.func import jacrev

    model_type, kw = CONFIGS[name]
    ref = torch_causal_lm(model_type, kw, seed=5)
    ref.save_pretrained(tmp_path)
    model = pj.load_model(str(tmp_path), require_tokenizer=False)
    layer = 1
    blk = (ref.gpt_neox if hasattr(ref, "gpt_neox") else ref.model).layers[layer].double()
    h = np.random.default_rng(0).normal(size=(4, kw["hidden_size"])) * 2.0 + 0.5
    want = np.stack([to_numpy(jacrev(lambda x: blk.mlp(blk.post_attention_layernorm(x)))(
        torch.tensor(v))) for v in h])
    bp = model.block(layer)
    h32 = jnp.asarray(h, jnp.float32)
    closed = mlp_jacobian.mlp_jacobian(bp, model.config, h32)
    gram = mlp_jacobian.mlp_frobenius_gram(bp, model.config, h32)
    e_closed = _rel(closed, want)
    e_gram = _rel(gram, np.linalg.norm(want, axis=(-2, -1)))
    print(f"{name}: closed form vs torch jacrev {e_closed:.1e}, Gram norms {e_gram:.1e}")
    assert e_closed < 1e-5 and e_gram < 1e-4


@slow
@pytest.mark.parametrize("family", ["neox", "llama"])
def test_sweep_mlp_family_matches_finite_differences(family):
    """jacobian_sweep's "mlp" family (closed-form matrices and Gram norms from one call) against
    central differences of continue_from entering at the MLP's input: resid_pre for NeoX's
    parallel residual, resid_mid for Llama."""
    cfg = (testing.tiny_neox_config(vocab_size=60) if family == "neox"
           else testing.tiny_llama_config(vocab_size=60, mlp_bias=True))
    model = testing.make_checkpoint(None, cfg, seed=2, scale=3.0, randomize_norms=True)
    prefix = pj.run_prefix(model, np.array([3, 14, 15, 9], np.int32))
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (3, cfg.d_model))
    out = jac.jacobian_sweep(model, prefix, x, 0, families=("mlp",), mlp_method="gram",
                             cumulative=False, full=("mlp",))
    full = np.asarray(out["mlp_full"], np.float64)  # closed form; "mlp_fro" from the Gram form
    assert _rel(out["mlp_fro"], np.linalg.norm(full, axis=(-2, -1))) < 1e-4
    site = pj.model.sites.mlp_input(cfg)
    assert site == ("resid_pre" if family == "neox" else "resid_mid")
    layer = 2  # rows of the sweep are layers 1, 2
    _, rec = pj.continue_from(model, prefix, x, 0, sites=[pj.site(layer, site)])
    h = np.asarray(rec[pj.site(layer, site)])[0]
    eps = 1e-2
    E = np.eye(cfg.d_model, dtype=np.float32) * eps
    _, fd = pj.continue_from(model, prefix, np.concatenate([h + E, h - E]), layer, site,
                             sites=[pj.site(layer, "mlp_out")])
    y = np.asarray(fd[pj.site(layer, "mlp_out")], np.float64)
    fd_jac = ((y[:cfg.d_model] - y[cfg.d_model:]) / (2 * eps)).T
    assert _rel(full[1, 0], fd_jac) < 2e-3


@slow
@pytest.mark.parametrize("family", ["neox", "llama"])
def test_every_jacobian_family_matches_central_differences_float64(family):
    """attn, layer, mlp and cumulative Jacobians of the new families (rotary, GQA, parallel
    residual) against central differences of continue_from, in float64."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        cfg = (testing.tiny_neox_config(vocab_size=60) if family == "neox"
               else testing.tiny_llama_config(vocab_size=60, attn_bias=True))
        model = to_float64(testing.make_checkpoint(None, cfg, seed=3, scale=3.0,
                                                   randomize_norms=True))
        prefix = pj.run_prefix(model, np.array([5, 8, 13], np.int32))
        x = jax.random.normal(jax.random.PRNGKey(2), (2, cfg.d_model), jnp.float64)
        out = jac.jacobian_sweep(model, prefix, x, 0, full=("mlp", "attn", "layer", "cumulative"))
        layer, eps, d = 1, 1e-5, cfg.d_model  # row 0 of the sweep is layer 1
        E = np.eye(d) * eps
        mlp_in = pj.model.sites.mlp_input(cfg)
        _, rec = pj.continue_from(model, prefix, x, 0, sites=[pj.site(layer, "resid_pre"),
                                                              pj.site(layer, mlp_in)])

        def fd(point, site, read, entry_layer=layer):
            _, r = pj.continue_from(model, prefix, np.concatenate([point + E, point - E]),
                                    entry_layer, site, sites=[read])
            y = np.asarray(r[read])
            return ((y[:d] - y[d:]) / (2 * eps)).T

        for k in range(2):
            pre = np.asarray(rec[pj.site(layer, "resid_pre")])[k]
            mid = np.asarray(rec[pj.site(layer, mlp_in)])[k]
            want = {"attn": fd(pre, "resid_pre", pj.site(layer, "attn_out")),
                    "layer": fd(pre, "resid_pre", pj.site(layer, "resid_post")),
                    "mlp": fd(mid, mlp_in, pj.site(layer, "mlp_out")),
                    "cumulative": fd(np.asarray(x)[k], "resid_post", pj.site(layer, "resid_post"), 0)}
            for fam, J in want.items():
                assert _rel(out[f"{fam}_full"][0, k], J) < 1e-7, (fam, k)
    finally:
        jax.config.update("jax_enable_x64", old)
