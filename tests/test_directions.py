"""Reference activations, direction baselines, responses, sensitive directions and slices,
against independent numpy computations and the model's own plain (uncached) forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax
from plateau_jax.compilation import CompileCounter
from plateau_jax.plateaus import directions as D
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import reference as R
from plateau_jax.plateaus import slices as S

LAYER, SITE = 1, "resid_pre"
TEXTS = ["The house was big", "The house was in the city", "The house was large and old",
         "A dog was small", "The car was red and fast", "It is in the box", "The man was tall",
         "She was happy", "They were here and there", "The sky is blue", "The cat sat on the mat",
         "The dog was big and red", "The city was old", "It was in the house",
         "The box was small and blue", "A man sat on the box"]


@pytest.fixture(scope="module")
def setup(plateau_model):
    model = plateau_model
    prompts, _ = R.tokenize_prompts(model, TEXTS, 32, 2)
    # Enough rows (every position, repeated texts with other last tokens) for a full-rank cov.
    ref_prompts = prompts * 3
    ref, acts = R.build_reference(model, ref_prompts, LAYER, SITE, positions="all", batch_size=16)
    base = R.collect_activations(model, prompts, LAYER, SITE, positions="last", batch_size=8)
    return model, prompts, ref, np.asarray(acts), np.asarray(base)


def _plain(model, prompts, x, layer=LAYER, site=SITE, sites=()):
    """Plain full forward of each prompt with its last position's site replaced by x [B, N, d]:
    logits [B, N, V] and {site: [B, N, d]} at the last position (numpy)."""
    B, N, d = x.shape
    out_logits, recs = [], {s: [] for s in sites}
    for b, p in enumerate(prompts):
        ids = np.repeat(np.asarray(p)[None], N, 0)
        logits, rec = plateau_jax.forward(model, ids, sites=list(sites),
                                          patches={plateau_jax.site(layer, site): x[b]})
        out_logits.append(np.asarray(logits)[:, -1])
        for s in sites:
            recs[s].append(np.asarray(rec[s])[:, -1])
    return np.stack(out_logits), {s: np.stack(v) for s, v in recs.items()}


# ----------------------------------------------------------------------------- reference

def test_reference_activations_and_moments_match_numpy(setup, tmp_path):
    model, prompts, ref, acts, base = setup
    name = plateau_jax.site(LAYER, SITE)
    plain = [np.asarray(plateau_jax.forward(model, p[None], sites=[name])[1][name])[0]
             for p in prompts]
    np.testing.assert_allclose(base, np.stack([a[-1] for a in plain]), rtol=1e-5, atol=1e-5)
    rows = np.concatenate([a[1:] for a in plain] * 3)  # every position after the first
    np.testing.assert_allclose(acts, rows, rtol=1e-5, atol=1e-5)
    assert ref.n == len(rows) and ref.mean.dtype == np.float64
    rows = acts.astype(np.float64)  # the float64 moments of exactly these float32 rows
    np.testing.assert_allclose(ref.mean, rows.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.cov, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)
    diffs = rows[:, None] - rows[None]
    iu = np.triu_indices(len(rows), 1)
    assert ref.typical_distance == pytest.approx(np.median(np.linalg.norm(diffs, axis=-1)[iu]),
                                                 rel=1e-9)
    # Streamed to disk (and saved statistics) equal the in-memory ones; another layer reuses
    # the compiled program (the layer is a runtime value).
    ref2, disk = R.build_reference(model, prompts * 3, LAYER, SITE, positions="all",
                                   batch_size=16, out_dir=str(tmp_path))
    np.testing.assert_array_equal(np.asarray(disk), acts)
    back = R.Reference.load(str(tmp_path / "reference.npz"))
    np.testing.assert_allclose(back.cov, ref.cov, rtol=1e-12, atol=1e-12)
    assert (back.layer, back.site, back.n) == (LAYER, SITE, ref.n)
    before = R._collect_program.cache_info().misses
    R.collect_activations(model, prompts[:8], 2, SITE, positions="last", batch_size=8)
    assert R._collect_program.cache_info().misses == before


def test_bad_inputs_fail_before_any_work(setup):
    model, prompts, ref, acts, base = setup
    with pytest.raises(ValueError, match="site 'mlp_out'"):
        R.collect_activations(model, prompts, 1, "mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        R.collect_activations(model, prompts, 7, "resid_post")
    with pytest.raises(ValueError, match="at least 2 are needed"):
        R.build_reference(model, prompts[:1], 1, "resid_post", positions="last")
    singular = R.reference_from_activations(acts[:10], LAYER, SITE, "all")  # 10 rows, d = 32
    with pytest.raises(R.SingularCovarianceError, match="singular"):
        singular.gaussian_factor()
    with pytest.raises(ValueError, match="at least 2 reference"):
        R.reference_from_activations(acts[:1], LAYER, SITE, "all")
    u = np.ones((len(prompts), 2, model.config.d_model))
    u[3, 1] = 0.0
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        D.perturbation_responses(model, prompts, base, u, [0, 1], LAYER, SITE, 1.0)
    with pytest.raises(ValueError, match="start at 0"):
        D.perturbation_responses(model, prompts, base, u + 1, [0.5, 1], LAYER, SITE, 1.0)
    with pytest.raises(ValueError, match="at least 1 point"):
        S.grid_axis(-1, 1, 0)
    with pytest.raises(ValueError, match="parallel"):
        S.plane_from_anchors(base[0], base[1], 2 * base[1] - base[0], 1.0)
    with pytest.raises(ValueError, match="zero length"):
        S.plane_from_directions(base[0], np.zeros_like(base[0]), base[1], 1.0)


# ----------------------------------------------------------------------------- generators

@pytest.mark.slow
def test_generators_match_numpy_and_are_seeded(setup):
    model, prompts, ref, acts, base = setup
    B, d = base.shape
    key = jax.random.PRNGKey(3)
    u, idx = D.real_directions(key, jnp.asarray(base), jnp.asarray(base), 5, jnp.arange(B))
    u, idx = np.asarray(u), np.asarray(idx)
    assert all(len(set(r)) == 5 and b not in r for b, r in enumerate(idx.tolist()))
    want = base[idx] - base[:, None]
    np.testing.assert_allclose(u, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(idx, np.asarray(D.real_directions(key, jnp.asarray(base),
                                                                    jnp.asarray(base), 5,
                                                                    jnp.arange(B))[1]))
    mix = np.asarray(D.mixture_directions(jnp.asarray(u[:, :4])))
    want = u[:, 0::2][:, :2] + u[:, 1::2][:, :2]
    np.testing.assert_allclose(mix, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)

    F = ref.gaussian_factor()
    np.testing.assert_allclose(F @ F.T, ref.cov, rtol=1e-8, atol=1e-8)
    mean32, F32 = jnp.asarray(ref.mean, jnp.float32), jnp.asarray(F, jnp.float32)
    y = np.asarray(D.gaussian_samples(key, mean32, F32, (B, 4)), np.float64)
    np.testing.assert_allclose(np.asarray(D.matched_directions(key, jnp.asarray(base), mean32, F32, 4)),
                               (y - base[:, None]) / np.linalg.norm(y - base[:, None], axis=-1,
                                                                    keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.asarray(D.cov_sample_directions(key, mean32, F32, B, 4)),
                               y / np.linalg.norm(y, axis=-1, keepdims=True), atol=1e-5)
    k1, k2 = jax.random.split(key)
    y1, y2 = (np.asarray(D.gaussian_samples(k, mean32, F32, (B, 4)), np.float64) for k in (k1, k2))
    np.testing.assert_allclose(np.asarray(D.cov_diff_directions(key, mean32, F32, B, 4)),
                               (y1 - y2) / np.linalg.norm(y1 - y2, axis=-1, keepdims=True),
                               atol=1e-5)

    # Matched Gaussian samples have the reference's mean and covariance within sampling error.
    n = 40000
    z = np.asarray(D.gaussian_samples(jax.random.PRNGKey(0), mean32, F32, (n,)), np.float64)
    sd = np.sqrt(np.diag(ref.cov))
    assert np.all(np.abs(z.mean(0) - ref.mean) < 5 * sd / np.sqrt(n))
    se = np.sqrt((np.outer(sd, sd) ** 2 + ref.cov ** 2) / n)
    assert np.all(np.abs(np.cov(z, rowvar=False) - ref.cov) < 6 * se)

    r = np.asarray(D.random_directions(key, B, 3, d))
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(r, np.asarray(D.random_directions(key, B, 3, d)))
    a, b = acts[:20], acts[20:45]
    v, norm = D.steering_direction(a, b)
    want = a.astype(np.float64).mean(0) - b.astype(np.float64).mean(0)
    np.testing.assert_allclose(v * norm, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- responses

def test_responses_equal_plain_forward_with_substitution(setup):
    model, prompts, ref, acts, base = setup
    # Prompts of one length: the plain reference compiles once per prompt length.
    same = [i for i, p in enumerate(prompts) if len(p) == 6][:4]
    prompts, base = [prompts[i] for i in same], base[same]
    B, d = base.shape
    u = np.asarray(D.random_directions(jax.random.PRNGKey(1), B, 2, d))
    lengths = np.array([0.0, 0.2, 0.5, 1.0])
    res = D.perturbation_responses(model, prompts, base, u, lengths, LAYER, SITE,
                                   ref.typical_distance, batch_size=4)
    x = (base[:, None, None] + lengths[None, None, :, None] * ref.typical_distance
         * u[:, :, None]).reshape(B, -1, d)
    names = [plateau_jax.site(l, "resid_post") for l in range(model.config.n_layer)]
    logits, rec = _plain(model, prompts, x.astype(np.float32), sites=names)
    logits = logits.reshape(B, 2, 4, -1)
    # t = 0 is the prompt's own output.
    own = np.stack([np.asarray(plateau_jax.forward(model, p[None])[0])[0, -1] for p in prompts])
    np.testing.assert_allclose(logits[:, 0, 0], own, rtol=1e-4, atol=1e-4)
    kl = metrics.kl_divergence(logits[:, :, :1], logits)
    np.testing.assert_allclose(res.kl, kl, rtol=1e-3, atol=2e-5)
    y = np.stack([rec[n].reshape(B, 2, 4, d) for n in names], axis=-2)  # [B, M, T, L, d]
    assert np.all(np.isnan(res.dist[..., 0]))  # layer 0's resid_post is not downstream
    np.testing.assert_allclose(res.dist[..., 1:], np.linalg.norm(y - y[:, :, :1], axis=-1)[..., 1:],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.dist_end[..., 1:],
                               np.linalg.norm(y - y[:, :, -1:], axis=-1)[..., 1:], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(res.logit_dist, np.linalg.norm(logits - logits[:, :, :1], axis=-1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.top, logits.argmax(-1))
    r = res.rel_distance()
    assert np.all(np.isnan(r[..., 0]))
    np.testing.assert_allclose(r[:, :, :, -1], metrics.relative_distance(logits), atol=1e-5)
    np.testing.assert_allclose(res.sharpness()[..., -1],
                               metrics.sharpness(metrics.relative_distance(logits), lengths),
                               rtol=1e-4)
    # Every other entry layer and site runs the same compiled program.
    with CompileCounter() as counter:
        for layer, site in ((0, "resid_post"), (2, "resid_mid")):
            other = D.perturbation_responses(model, prompts, base, u, lengths, layer, site,
                                             ref.typical_distance, batch_size=4)
    assert counter.count == 0
    assert np.all(np.isnan(other.dist[..., :2])) and np.all(np.isfinite(other.dist[..., 2]))


def test_activation_threshold_interpolates_the_first_crossing():
    kl = np.array([[0.0, 0.05, 0.3, 0.2, 0.9], [0.0, 0.01, 0.02, 0.03, 0.04], [0.0, 0.5, 0, 0, 0]])
    t = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    got = D.activation_threshold(kl, t, 0.1)
    np.testing.assert_allclose(got[0], 0.5 + 0.5 * (0.1 - 0.05) / (0.3 - 0.05))
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[2], 0.5 * 0.1 / 0.5)
    with pytest.raises(ValueError, match="> 0"):
        D.activation_threshold(kl, t, 0.0)


LENGTH = 0.15


def _sensitive(setup, **kwargs):
    """Four base points of one prompt length (one plain-forward compile) and their search."""
    model, prompts, ref, acts, base = setup
    idx = [i for i, p in enumerate(prompts) if len(p) == 6][:4]
    prompts, base = [prompts[i] for i in idx], base[idx]
    res = D.find_sensitive_directions(model, prompts, base, LAYER, SITE, ref.typical_distance,
                                      length=LENGTH, learning_rate=0.1, **kwargs)
    return model, prompts, ref, base, res


@pytest.mark.slow
def test_sensitive_beats_best_of_1000_random_directions(setup):
    model, prompts, ref, base, res = _sensitive(setup, restarts=2, steps=20, seed=0)
    B, d = base.shape
    length = LENGTH
    assert res.directions.shape == (B, 2, d) and res.trace.shape == (B, 2, 20)
    np.testing.assert_allclose(np.linalg.norm(res.directions, axis=-1), 1.0, atol=1e-5)
    assert np.all(np.diff(res.objective, axis=1) <= 0)  # restarts sorted best first
    assert np.all(res.objective[:, 0] > res.trace[:, 0, 0])  # the ascent went up
    # Its objective, recomputed by the plain forward with the vector substituted.
    x = base[:, None] + length * ref.typical_distance * res.best
    logits, _ = _plain(model, prompts, np.concatenate([base[:, None], x], 1).astype(np.float32))
    kl_best = metrics.kl_divergence(logits[:, 0], logits[:, 1])
    np.testing.assert_allclose(kl_best, res.objective[:, 0], rtol=1e-3, atol=1e-6)
    # It beats the best of 1000 random directions of the same length.
    rand = np.asarray(D.random_directions(jax.random.PRNGKey(7), B, 1000, d))
    rr = D.perturbation_responses(model, prompts, base, np.concatenate([res.best, rand], 1),
                                  [0.0, length], LAYER, SITE, ref.typical_distance)
    np.testing.assert_allclose(rr.kl[:, 0, 1], kl_best, rtol=1e-3, atol=1e-6)
    assert np.all(kl_best > rr.kl[:, 1:, 1].max(axis=1))
    again = _sensitive(setup, restarts=2, steps=20, seed=0)[-1]
    np.testing.assert_array_equal(again.directions, res.directions)


@pytest.mark.slow
def test_sensitive_distance_objective_beats_random(setup):
    model, prompts, ref, base, res = _sensitive(setup, restarts=2, steps=20,
                                                objective="distance", target_layer=2)
    B, d = base.shape
    length = LENGTH
    name = plateau_jax.site(2, "resid_post")
    x = base[:, None] + length * ref.typical_distance * res.best
    _, rec = _plain(model, prompts, np.concatenate([base[:, None], x], 1).astype(np.float32),
                    sites=[name])
    np.testing.assert_allclose(np.linalg.norm(rec[name][:, 1] - rec[name][:, 0], axis=-1),
                               res.objective[:, 0], rtol=1e-3)
    rand = np.asarray(D.random_directions(jax.random.PRNGKey(7), B, 1000, d))
    rr = D.perturbation_responses(model, prompts, base, rand, [0.0, length], LAYER, SITE,
                                  ref.typical_distance)
    assert np.all(res.objective[:, 0] > np.max(rr.dist[:, :, 1, 2], axis=1))
    with pytest.raises(ValueError, match="not downstream"):
        D.find_sensitive_directions(model, prompts, base, LAYER, SITE, ref.typical_distance,
                                    length=length, objective="distance", target_layer=0)


@pytest.mark.slow
def test_response_composes_with_jit_and_grad(setup):
    model, prompts, ref, acts, base = setup
    cfg = model.config
    ids, lengths = R.pad_prompts(prompts[:2])
    cache = D.context_cache(model.params, cfg, jnp.asarray(ids), jnp.asarray(lengths))
    u = jnp.asarray(D.random_directions(jax.random.PRNGKey(2), 2, 1, cfg.d_model))
    entry = jnp.int32(plateau_jax.model.sites.entry_index(LAYER, SITE, cfg))

    def kl_at(s):
        steps = jnp.stack([0.0, s])
        return D.response(model.params, cfg, cache, jnp.asarray(base[:2]), u, steps, entry)["kl"][:, 0, 1].sum()

    s0, h = 0.3 * ref.typical_distance, 1e-2
    g = jax.jit(jax.grad(kl_at))(s0)
    fd = (kl_at(s0 + h) - kl_at(s0 - h)) / (2 * h)
    np.testing.assert_allclose(float(g), float(fd), rtol=2e-2)


# ----------------------------------------------------------------------------- slices

@pytest.mark.slow
def test_slice_grid_point_equals_direct_continuation(setup):
    model, prompts, ref, acts, base = setup
    ctx = prompts[0][:-1]
    cache = plateau_jax.run_prefix(model, ctx)
    others = [np.append(ctx, p[-1]) for p in prompts[1:3]]  # same context, other last tokens
    anchors = np.concatenate([base[:1], R.collect_activations(model, others, LAYER, SITE)])
    plane = S.plane_from_anchors(*anchors, ref.typical_distance)
    np.testing.assert_allclose(plane.points(plane.anchor_coords[:, 0], plane.anchor_coords[:, 1])
                               [np.arange(3), np.arange(3)], anchors, rtol=1e-5, atol=1e-4)
    s, t = S.grid_axis(-0.5, 1.5, 5), S.grid_axis(-0.5, 1.0, 4)
    sl = S.compute_slice(model, cache, plane, LAYER, SITE, s, t, chunk=6)
    assert sl.top.shape == (5, 4) and sl.kl.shape == (3, 5, 4)
    pts = plane.points(s, t).reshape(-1, anchors.shape[1]).astype(np.float32)
    direct, _ = plateau_jax.continue_from(model, cache, np.concatenate([anchors, pts]), layer=LAYER,
                                          site=SITE)
    direct = np.asarray(direct)
    la, lp = direct[:3], direct[3:]
    np.testing.assert_array_equal(sl.top.ravel(), lp.argmax(-1))
    np.testing.assert_array_equal(sl.anchor_top, la.argmax(-1))
    np.testing.assert_allclose(sl.kl.reshape(3, -1), metrics.kl_divergence(la[:, None], lp[None]),
                               rtol=1e-3, atol=1e-5)
    dist = np.linalg.norm(lp[None] - la[:, None], axis=-1)
    np.testing.assert_allclose(sl.rel_distance().ravel(), dist[0] / (dist[0] + dist[1]), atol=1e-5)
    one = S.plane_from_directions(anchors[0], np.asarray(base[3] - base[0]),
                                  np.asarray(base[4] - base[0]), ref.typical_distance)
    np.testing.assert_allclose([one.e1 @ one.e1, one.e1 @ one.e2], [1.0, 0.0], atol=1e-12)
