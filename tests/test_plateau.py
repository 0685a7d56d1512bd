"""Interpolation runs and freezing against plain full forwards with the vector substituted."""

import numpy as np
import pytest

import plateau_jax
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import interpolation
from plateau_jax.plateaus import prompts
from plateau_jax.model.sites import site_name
from plateau_jax.plateaus.interpolation import interpolation_run
from conftest import CONTEXT

ALPHA = np.linspace(0.0, 1.0, 7)


@pytest.fixture(scope="module")
def setup(plateau_model):
    model = plateau_model
    pairs = prompts.encode_pairs(model.tokenizer, CONTEXT, prompts.parse_pairs("big:in,big:large"),
                                 model.config.n_positions)
    prefix = plateau_jax.run_prefix(model, pairs[0].context_ids)
    tokens = np.array([[p.token_a, p.token_b] for p in pairs])  # [P, 2]
    return model, pairs, prefix, tokens


def _full_forward_reference(model, pairs, tokens, x, layer, site, names):
    """Plain forward of context + ending with x substituted at the last position: [P, n, ...]."""
    P, n, d = x.shape
    ids = np.stack([np.concatenate([p.context_ids, [tokens[i, 0]]]) for i, p in enumerate(pairs)
                    for _ in range(n)])
    logits, rec = plateau_jax.forward(model, ids, sites=names,
                                      patches={plateau_jax.site(layer, site): x.reshape(P * n, d)})
    last = lambda a: np.asarray(a)[:, -1].reshape(P, n, -1)
    return last(logits), {k: last(v) for k, v in rec.items()}


@pytest.mark.parametrize("layer,site", [(0, "resid_post"),
                                        pytest.param(1, "resid_mid", marks=pytest.mark.slow)])
def test_run_equals_full_forward_with_substitution(setup, layer, site):
    model, pairs, prefix, tokens = setup
    ends = interpolation.endpoint_activations(model, prefix, tokens.ravel(), [layer], site)[0]
    ends = np.asarray(ends).reshape(2, 2, -1)
    # Endpoints are the clean prompts' activations at the interpolation site.
    ids = np.stack([np.append(pairs[0].context_ids, t) for t in tokens.ravel()])
    _, rec = plateau_jax.forward(model, ids, sites=[plateau_jax.site(layer, site)])
    np.testing.assert_allclose(ends.reshape(4, -1), np.asarray(rec[plateau_jax.site(layer, site)])[:, -1],
                               rtol=1e-5, atol=1e-5)
    run = interpolation_run(model, prefix, ends[:, 0], ends[:, 1], layer, ALPHA, site=site)
    first = layer + 1 if site == "resid_post" else layer
    assert run.layers == tuple(range(first, model.config.n_layer))
    skipped = {(layer, "attn_out")} if site == "resid_mid" else set()  # upstream of the entry
    names = [site_name(l, c) for l in run.layers for c in interpolation.DEFAULT_COMPONENTS
             if (l, c) not in skipped]
    ref_logits, ref = _full_forward_reference(model, pairs, tokens, np.asarray(run.x), layer, site,
                                              names)
    np.testing.assert_allclose(np.asarray(run.logits), ref_logits, rtol=2e-4, atol=2e-4)
    for c in interpolation.DEFAULT_COMPONENTS:
        got = np.asarray(run.acts[c])
        assert got.shape[:3] == (2, len(run.layers), ALPHA.size)
        for j, l in enumerate(run.layers):
            if (l, c) in skipped:
                assert np.all(np.isnan(got[:, j]))
                continue
            np.testing.assert_allclose(got[:, j], ref[site_name(l, c)], rtol=2e-4, atol=2e-4,
                                       err_msg=f"{c} layer {l}")
    # The path starts and ends at the clean prompts: r is 0 and 1 there and varies in between.
    r = metrics.relative_distance(run.acts["resid_post"])
    assert np.all(r[..., 0] == 0) and np.all(r[..., -1] == 1)
    assert np.all(np.diff(r[..., 1:-1], axis=-1) != 0)


@pytest.fixture(scope="module")
def clean(setup):
    model, pairs, prefix, tokens = setup
    ends = np.asarray(interpolation.endpoint_activations(model, prefix, tokens.ravel(), [0])[0])
    ends = ends.reshape(2, 2, -1)
    return interpolation_run(model, prefix, ends[:, 0], ends[:, 1], 0, ALPHA)


def _rerun(setup, clean, patches):
    model, _, prefix, _ = setup
    a, b = np.asarray(clean.x)[:, 0], np.asarray(clean.x)[:, -1]
    return interpolation_run(model, prefix, a, b, 0, ALPHA, patches=patches)


def test_freezing_to_clean_values_changes_nothing(setup, clean):
    patches = {site_name(l, "mlp_out"): clean.act("mlp_out", l) for l in clean.layers}
    patches.update({site_name(l, "attn_out"): clean.act("attn_out", l) for l in clean.layers})
    again = _rerun(setup, clean, patches)
    np.testing.assert_allclose(np.asarray(again.logits), np.asarray(clean.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("component,other", [("mlp", "attn"), ("attn", "mlp")])
def test_freezing_to_mean_makes_component_constant(setup, clean, component, other):
    frozen = _rerun(setup, clean, interpolation.freeze_patches(clean, component, "mean"))
    got = np.asarray(frozen.acts[f"{component}_out"])  # [P, layers, n, d]
    want_mean = np.asarray(clean.acts[f"{component}_out"]).mean(axis=-2, keepdims=True)
    np.testing.assert_allclose(got, np.broadcast_to(want_mean, got.shape), rtol=1e-5, atol=1e-6)
    # The other component and the outputs still vary along the path: in every pair and layer,
    # some coordinate moves by far more than the frozen one's tolerance (not every coordinate:
    # one of 32 may barely move with these random weights).
    assert np.ptp(np.asarray(frozen.acts[f"{other}_out"]), axis=-2).max(-1).min() > 1e-3
    assert np.all(metrics.step_sizes(frozen.logits) > 0)
    # The last layer's attention reads the frozen earlier layer, so outputs differ from clean.
    assert np.abs(np.asarray(frozen.logits) - np.asarray(clean.logits)).max() > 1e-3


def test_freeze_endpoint_a_and_linear(setup, clean):
    fa = interpolation.freeze_patches(clean, "mlp", "endpoint_a", layers=[2])
    assert list(fa) == ["blocks.2.hook_mlp_out"]
    lin = interpolation.freeze_patches(clean, "mlp", "linear", layers=[2])["blocks.2.hook_mlp_out"]
    v = np.asarray(clean.act("mlp_out", 2))
    np.testing.assert_allclose(np.asarray(fa["blocks.2.hook_mlp_out"]),
                               np.broadcast_to(v[:, :1], v.shape))
    np.testing.assert_allclose(np.asarray(lin), v[:, :1] + ALPHA[:, None] * (v[:, -1:] - v[:, :1]),
                               rtol=1e-5, atol=1e-6)
    # Frozen to the endpoint-A value, step 0 is the clean run; frozen on the line, both ends are.
    run_a = _rerun(setup, clean, fa)
    np.testing.assert_allclose(np.asarray(run_a.logits)[:, 0], np.asarray(clean.logits)[:, 0],
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(run_a.logits)[:, -1] - np.asarray(clean.logits)[:, -1]).max() > 1e-3


def test_nonfinite_values_are_named_by_step_and_layer(setup, clean):
    bad = np.array(clean.act("mlp_out", 2))
    bad[1, 3, 0] = np.nan
    with pytest.raises(interpolation.NonFiniteError, match=r"step 3 .*layer 2 \(blocks.2.hook_mlp_out\)"):
        _rerun(setup, clean, {"blocks.2.hook_mlp_out": bad})


def test_bad_arguments(setup, clean):
    model, _, prefix, _ = setup
    a = np.asarray(clean.x)[0, 0]
    with pytest.raises(ValueError, match="out of range"):
        interpolation_run(model, prefix, a, a, 3, ALPHA)
    with pytest.raises(ValueError, match="interpolation site"):
        interpolation_run(model, prefix, a, a, 0, ALPHA, site="mlp_out")
    with pytest.raises(ValueError, match="not downstream"):
        interpolation_run(model, prefix, a, a, 1, ALPHA, layers=[1])
    with pytest.raises(ValueError, match="Unknown path"):
        interpolation_run(model, prefix, a, a, 0, ALPHA, path="cubic")
    with pytest.raises(ValueError, match="Unknown freeze mode"):
        interpolation.freeze_patches(clean, "mlp", "first")
    with pytest.raises(ValueError, match="freeze sublayer"):
        interpolation.freeze_patches(clean, "ln", "mean")
