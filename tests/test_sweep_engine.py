"""The engine's curves and statistics against plain numpy on activations recorded through the
public API (unpadded prefixes, full forward for the endpoints, autodiff Jacobians)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax.plateaus import paths
from plateau_jax.model.layers import gelu_new
from plateau_jax.sweep import pair_stats

from sweep_helpers import BATCH, SPEC, batch, one_device_engine


@pytest.fixture(scope="module")
def engine_out(tiny_model):
    pairs, ids, lengths, ta, tb = batch(tiny_model, 2)  # two context lengths: padding exercised
    return pairs, one_device_engine(tiny_model).run(0, ids, lengths, ta, tb, pad_to=BATCH)


def _np_r(y):
    y = np.asarray(y, np.float64)
    da = np.linalg.norm(y - y[:1], axis=-1)
    db = np.linalg.norm(y - y[-1:], axis=-1)
    return da / (da + db)


def _np_d(y):
    y = np.asarray(y, np.float64)
    d = np.linalg.norm(y - y[:1], axis=-1)
    return d / d[-1]


def _lsm(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(p, q):
    lp, lq = _lsm(p), _lsm(q)
    return np.sum(np.exp(lp) * (lp - lq), -1)


@functools.partial(jax.jit, static_argnums=2)
def _mlp_fro_jit(bp, h, eps):
    def mlp(x):  # ln_2 + MLP of one position, written out
        mu = x.mean()
        v = ((x - mu) ** 2).mean()
        u = (x - mu) / jnp.sqrt(v + eps) * bp["ln2"]["w"] + bp["ln2"]["b"]
        pre = u @ bp["mlp"]["W_in"] + bp["mlp"]["b_in"]
        return gelu_new(pre) @ bp["mlp"]["W_out"] + bp["mlp"]["b_out"]

    return jax.vmap(jax.jacfwd(mlp))(h)


def _mlp_fro(params, cfg, layer, h):
    jac = _mlp_fro_jit(pj.block_params(params, layer), jnp.asarray(h, jnp.float32), cfg.norm_eps)
    return np.linalg.norm(np.asarray(jac, np.float64), axis=(-2, -1))


def test_curves_and_stats_match_numpy(tiny_model, engine_out):
    model, cfg = tiny_model, tiny_model.config
    assert cfg.n_layer == 3
    pairs, out = engine_out
    alpha = SPEC.alpha
    layers = list(range(1, cfg.n_layer))
    # Targets are every layer then the logits; layers at or before the interpolation layer (0)
    # are NaN. Compare the downstream rows.
    per_target = ("r", "dist", "step", "jac", "hamming", "mid_step", "kstar", "ref_lo", "ref_hi",
                  "ref_r_lo", "ref_r_hi", "ref_kl", "win_lo", "win_hi", "win_r_lo", "win_r_hi",
                  "win_d_lo", "win_d_hi")
    for k in per_target:
        if k != "kstar":
            assert np.isnan(out[k][:, 0]).all(), k
    out = {k: (v[:, 1:] if k in per_target else v) for k, v in out.items()}
    for i, p in enumerate(pairs):
        ends = []
        for tok in (p.token_a, p.token_b):  # endpoints from a plain full forward
            ids = np.concatenate([p.context_ids, [tok]])[None]
            _, c = pj.forward(model, ids, sites=["blocks.0.hook_resid_post"])
            ends.append(np.asarray(c["blocks.0.hook_resid_post"][0, -1]))
        prefix = pj.run_prefix(model, p.context_ids)
        xs = paths.interpolate(jnp.asarray(ends[0]), jnp.asarray(ends[1]), alpha, "slerp")
        sites = [pj.site(l, s) for l in layers for s in ("resid_post", "resid_mid", "mlp.hook_pre")]
        logits, rec = pj.continue_from(model, prefix, xs, 0, "resid_post", sites=sites)
        logits = np.asarray(logits, np.float64)
        r = np.stack([_np_r(rec[pj.site(l, "resid_post")]) for l in layers] + [_np_r(logits)])
        np.testing.assert_allclose(out["r"][i], r, atol=2e-5)
        dist = np.stack([_np_d(rec[pj.site(l, "resid_post")]) for l in layers] + [_np_d(logits)])
        np.testing.assert_allclose(out["dist"][i], dist, atol=5e-5)
        a64, b64 = np.asarray(ends[0], np.float64), np.asarray(ends[1], np.float64)
        cos = a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64)
        np.testing.assert_allclose(out["angle"][i], np.arccos(cos), rtol=1e-5)
        steps = np.stack([np.linalg.norm(np.diff(np.asarray(rec[pj.site(l, "resid_post")], np.float64), axis=0), axis=-1)
                          for l in layers] + [np.linalg.norm(np.diff(logits, axis=0), axis=-1)])
        np.testing.assert_allclose(out["step"][i], steps, rtol=1e-4, atol=1e-5)
        for j, l in enumerate(layers):
            mid = np.asarray(rec[pj.site(l, "resid_mid")], np.float64)
            pre = np.asarray(rec[pj.site(l, "mlp.hook_pre")])
            np.testing.assert_allclose(out["mid_step"][i, j],
                                       np.linalg.norm(np.diff(mid, axis=0), axis=-1), rtol=1e-4, atol=1e-6)
            ham = np.array([np.sum((pre[k] > 0) != (pre[k + 1] > 0)) for k in range(len(alpha) - 1)])
            assert np.abs(out["hamming"][i, j] - ham).max() <= 1  # a neuron at ~0 may flip in float32
            np.testing.assert_allclose(out["jac"][i, j], _mlp_fro(model.params, cfg, l, mid), rtol=1e-4)
        np.testing.assert_allclose(out["kl_next"][i], _kl(logits[:-1], logits[1:]), atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(out["kl_a"][i], _kl(logits[:1], logits), atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(out["kl_b"][i], _kl(logits[-1:], logits), atol=1e-5, rtol=1e-3)
        # steepest step and the refined bracket, re-evaluated through the public API
        s = np.diff(r, axis=-1) / np.diff(alpha)
        np.testing.assert_array_equal(out["kstar"][i], np.argmax(s, axis=-1))
        lo, hi = out["ref_lo"][i].astype(np.float64), out["ref_hi"][i].astype(np.float64)
        k = out["kstar"][i]
        assert np.all(hi - lo <= SPEC.tol + 1e-7)
        assert np.all((lo >= alpha[k] - 1e-7) & (hi <= alpha[k + 1] + 1e-7))
        for t in range(len(layers) + 1):
            xe = paths.interpolate(jnp.asarray(ends[0]), jnp.asarray(ends[1]), np.array([lo[t], hi[t]]), "slerp")
            lg, rc = pj.continue_from(model, prefix, xe, 0, "resid_post", sites=sites)
            if t < len(layers):
                y, y_grid = np.asarray(rc[pj.site(layers[t], "resid_post")], np.float64), \
                    np.asarray(rec[pj.site(layers[t], "resid_post")], np.float64)
            else:
                y, y_grid = np.asarray(lg, np.float64), logits
            da = np.linalg.norm(y - y_grid[0], axis=-1)
            db = np.linalg.norm(y - y_grid[-1], axis=-1)
            np.testing.assert_allclose([out["ref_r_lo"][i, t], out["ref_r_hi"][i, t]], da / (da + db), atol=2e-5)
            np.testing.assert_allclose(out["ref_kl"][i, t], _kl(np.asarray(lg[0]), np.asarray(lg[1])),
                                       atol=1e-5, rtol=1e-3)
            # the fixed-width window: width w centred on the refined boundary, inside [0, 1]
            wlo, whi = float(out["win_lo"][i, t]), float(out["win_hi"][i, t])
            c = 0.5 * (lo[t] + hi[t])
            assert whi - wlo == pytest.approx(SPEC.sharpness_width, abs=1e-6)
            assert 0 <= wlo and whi <= 1 + 1e-6
            assert wlo == pytest.approx(min(max(c - SPEC.sharpness_width / 2, 0),
                                            1 - SPEC.sharpness_width), abs=1e-6)
            xe = paths.interpolate(jnp.asarray(ends[0]), jnp.asarray(ends[1]), np.array([wlo, whi]), "slerp")
            lg, rc = pj.continue_from(model, prefix, xe, 0, "resid_post", sites=sites)
            y = (np.asarray(rc[pj.site(layers[t], "resid_post")], np.float64) if t < len(layers)
                 else np.asarray(lg, np.float64))
            y_grid = (np.asarray(rec[pj.site(layers[t], "resid_post")], np.float64)
                      if t < len(layers) else logits)
            da = np.linalg.norm(y - y_grid[0], axis=-1)
            db = np.linalg.norm(y - y_grid[-1], axis=-1)
            np.testing.assert_allclose([out["win_r_lo"][i, t], out["win_r_hi"][i, t]], da / (da + db),
                                       atol=2e-5)
            np.testing.assert_allclose([out["win_d_lo"][i, t], out["win_d_hi"][i, t]],
                                       da / np.linalg.norm(y_grid[-1] - y_grid[0]), atol=5e-5)
    assert out["finite"].all()
    # host statistics from these curves are plateau_jax.plateaus.metrics on the same r
    # (tested there)
    st = pair_stats(out, alpha)
    np.testing.assert_allclose(st["S_r_grid"], np.max(np.diff(out["r"].astype(np.float64), axis=-1)
                                                      / np.diff(alpha), axis=-1), rtol=1e-12)
    np.testing.assert_allclose(st["S_d_grid"], np.max(np.diff(out["dist"].astype(np.float64), axis=-1)
                                                      / np.diff(alpha), axis=-1), rtol=1e-12)
    w = out["win_hi"].astype(np.float64) - out["win_lo"]
    np.testing.assert_allclose(st["S_r_ref"], (out["win_r_hi"] - out["win_r_lo"].astype(np.float64)) / w)
    np.testing.assert_allclose(st["S_d_ref"], (out["win_d_hi"] - out["win_d_lo"].astype(np.float64)) / w)


@pytest.mark.slow
def test_refining_the_logits_only_gives_the_same_logits_values(tiny_model, engine_out):
    """refine="logits" (the default) refines the logits target alone, to the same values as
    refine="all" gives it; every layer target's refined values are NaN."""
    import dataclasses

    from plateau_jax.sweep import SweepEngine, make_mesh

    pairs, full = engine_out
    _, ids, lengths, ta, tb = batch(tiny_model, 2)
    spec = dataclasses.replace(SPEC, refine="logits")
    out = SweepEngine(tiny_model, spec, mesh=make_mesh(jax.devices()[:1])).run(
        0, ids, lengths, ta, tb, pad_to=BATCH)
    for key in ("ref_lo", "ref_hi", "ref_r_lo", "ref_r_hi", "ref_kl", "win_lo", "win_hi",
                "win_r_lo", "win_r_hi", "win_d_lo", "win_d_hi"):
        np.testing.assert_allclose(out[key][:, -1], full[key][:, -1], rtol=1e-6, atol=1e-7)
        assert np.isnan(out[key][:, :-1]).all(), key
    np.testing.assert_array_equal(out["r"], full["r"])
