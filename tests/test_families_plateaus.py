"""GPT-NeoX (parallel residual) and Llama-style (GQA, SwiGLU) models through everything built on
the core: continuation vs full forward (rotary positions after padded contexts included), the
plateau study with freezing and every figure, and the sweep engine's curves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax import testing
from plateau_jax.model.layers import mlp_part
from plateau_jax.plateaus import interpolation, paths, prompts
from conftest import random_ids, right_padded_contexts

FAMILIES = {"neox": testing.tiny_neox_config, "llama": testing.tiny_llama_config}


slow = pytest.mark.slow


# The fast suite runs the Llama-style model (RMSNorm, GQA, SwiGLU, rotary); NeoX is in the slow.
@pytest.fixture(scope="module", params=["llama", pytest.param("neox", marks=slow)])
def model(request, tiny_tokenizer):
    """A random model with the tiny tokenizer (prompts need one): weights x3 and random norms
    and biases, so that every parameter and nonlinearity matters."""
    return testing.make_checkpoint(None, FAMILIES[request.param](), seed=4,
                                   tokenizer=tiny_tokenizer, scale=3.0, randomize_norms=True)


@pytest.mark.parametrize("layer,where", [(0, "resid_pre"), pytest.param(1, "resid_post", marks=slow)])
def test_continuation_equals_full_forward_with_substitution(model, layer, where):
    cfg = model.config
    ids = random_ids(cfg.vocab_size, (6,), seed=layer)
    name = pj.site(layer, where)
    _, clean = pj.forward(model, ids, sites=[name])
    x = clean[name][0, -1] + np.random.default_rng(1).normal(size=(3, cfg.d_model)).astype(np.float32)
    down = [pj.site(l, s) for l in range(layer + 1, cfg.n_layer)
            for s in ("hook_attn_out", "mlp.hook_post", "hook_resid_post")]
    want_logits, want = pj.forward(model, np.repeat(ids[None], 3, 0), sites=down, patches={name: x})
    prefix = pj.run_prefix(model, ids[:-1])
    logits, rec = pj.continue_from(model, prefix, x, layer, where, sites=down)
    assert np.abs(np.asarray(logits) - np.asarray(want_logits[:, -1])).max() <= 1e-5
    for s in down:
        assert np.abs(np.asarray(rec[s]) - np.asarray(want[s][:, -1])).max() <= 1e-5, s


@slow
def test_padded_contexts_put_the_next_token_at_its_rotary_position(model):
    ctx, padded = right_padded_contexts(model.config.vocab_size, (2, 5))
    prefix = pj.run_prefix(model, padded, lengths=[2, 5])
    last = np.array([[7], [11]])
    logits, _ = pj.continue_from(model, prefix, pj.embed_last(model, prefix, last), 0, "resid_pre")
    for i, c in enumerate(ctx):
        want, _ = pj.forward(model, np.append(c, last[i]))
        assert np.abs(np.asarray(logits[i, 0]) - np.asarray(want[0, -1])).max() <= 1e-5


@slow
def test_plateau_study_freezing_and_figures(model, tmp_path):
    from experiments import plateaus as study
    from plateau_jax.plotting import plateaus as plotting

    cfg = model.config
    pairs = prompts.encode_pairs(model.tokenizer, "The house was", prompts.parse_pairs("big:in"),
                                 cfg.n_positions)
    alpha = paths.alpha_grid(6)
    res = study.run_study(model, pairs, alpha, layer=0, interp_layers=[0, 1], site="resid_post",
                          path="slerp", freeze_mode="mean", freeze_layers=[1, 2], distances=[1])
    mlp_in = pj.model.sites.mlp_input(cfg)
    assert ("r_resid_mid" in res) == cfg.has_resid_mid and f"r_{mlp_in}" in res
    assert np.isfinite(res["spline_density"][:, 1:]).all()
    assert np.isfinite(res["frozen_r_logits"]).all() and res["frozen_r_logits"].shape == (1, 3, 6)
    # freezing the MLPs at their clean mean changes the logits path
    assert np.abs(res["frozen_r_logits"][0, 2] - res["r_logits"][0]).max() > 1e-3
    np.savez(tmp_path / "results.npz", **res, model_name=np.array("m"), context=np.array("c"),
             site=np.array("resid_post"), interp_path=np.array("slerp"),
             freeze_mode=np.array("mean"))
    figs = plotting.save_all(plotting.load_results(str(tmp_path / "results.npz")), str(tmp_path),
                             "png")
    assert figs and all(open(f, "rb").read(4) == b"\x89PNG" for f in figs)


@slow
def test_sweep_engine_curves(model):
    from sweep_helpers import BATCH, SPEC, batch, one_device_engine

    cfg = model.config
    pairs, ids, lengths, ta, tb = batch(model, 2)
    out = one_device_engine(model).run(0, ids, lengths, ta, tb, pad_to=BATCH)
    mlp_in = pj.model.sites.mlp_input(cfg)
    for i, p in enumerate(pairs):  # unpadded public API as the reference
        prefix = pj.run_prefix(model, p.context_ids)
        ends = interpolation.endpoint_activations(model, prefix, [p.token_a, p.token_b], [0])[0]
        xs = paths.interpolate(ends[0], ends[1], SPEC.alpha, "slerp")
        sites = [pj.site(l, s) for l in (1, 2) for s in ("resid_post", mlp_in)]
        logits, rec = pj.continue_from(model, prefix, xs, 0, sites=sites)
        y = np.asarray(logits, np.float64)
        da, db = (np.linalg.norm(y - y[k], axis=-1) for k in (0, -1))
        np.testing.assert_allclose(out["r"][i, -1], da / (da + db), atol=2e-5)
        for l in (1, 2):
            h = np.asarray(rec[pj.site(l, mlp_in)])
            np.testing.assert_allclose(out["mid_step"][i, l],
                                       np.linalg.norm(np.diff(h, axis=0), axis=-1), rtol=1e-4, atol=1e-6)
            bp = model.block(l)
            J = jax.vmap(jax.jacfwd(lambda v: mlp_part(bp, v[None, None], cfg)[0, 0]))(jnp.asarray(h))
            np.testing.assert_allclose(out["jac"][i, l], np.linalg.norm(np.asarray(J), axis=(-2, -1)),
                                       rtol=1e-4)
    assert out["finite"].all()
    if not cfg.has_resid_mid:
        from plateau_jax.sweep import SweepEngine, SweepSpec
        with pytest.raises(pj.UnknownSiteError, match="parallel residual"):
            SweepEngine(model, SweepSpec(component="resid_mid"))


@slow
def test_jacobian_script_on_a_parallel_residual_model(model, tmp_path):
    """`python -m experiments.jacobians` end to end (two pairs share the Gram matrices)."""
    import os
    import subprocess
    import sys

    d = tmp_path / "ckpt"
    pj.save_model(model, str(d))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.jacobians", f"--model={d}", "--steps=5",
         "--pairs=big:in,big:large", f"--output_dir={out}", "--compilation_cache="],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PLATEAU_JAX_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "jacobians" / "jacobians_big-in.npz") as r:  # the published run
        fro = r["mlp_fro"]
        assert fro.shape[-1] == 5 and np.isfinite(fro).all() and (fro > 0).all()
