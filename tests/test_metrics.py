"""Plateau metrics against hand-made arrays and plain numpy loops."""

import numpy as np
import pytest

from plateau_jax.plateaus import metrics


def _loop_relative_distance(y):
    out = np.zeros(len(y))
    for k, v in enumerate(y):
        da, db = np.sqrt(np.sum((v - y[0]) ** 2)), np.sqrt(np.sum((v - y[-1]) ** 2))
        out[k] = da / (da + db)
    return out


def test_relative_distance_matches_loop_and_is_exact_at_endpoints():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 4, 11, 7))  # pairs x layers x steps x d
    r = metrics.relative_distance(y)
    assert r.shape == (3, 4, 11)
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(r[i, j], _loop_relative_distance(y[i, j]), rtol=1e-12)
    assert np.all(r[..., 0] == 0.0) and np.all(r[..., -1] == 1.0)


def test_relative_distance_of_straight_line_is_alpha_and_frozen_is_nan():
    alpha = np.linspace(0, 1, 9)
    a, b = np.array([1.0, -2.0, 0.5]), np.array([3.0, 1.0, -1.0])
    line = a + alpha[:, None] * (b - a)
    np.testing.assert_allclose(metrics.relative_distance(line), alpha, atol=1e-12)
    np.testing.assert_allclose(metrics.distance_curve(line), alpha, atol=1e-12)
    assert np.all(np.isnan(metrics.relative_distance(np.ones((5, 3)))))


def test_step_sizes_and_spline_density():
    y = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [3.0, 5.0]])
    np.testing.assert_allclose(metrics.step_sizes(y), [5.0, 0.0, 1.0])
    pre = np.array([[1.0, -1.0, 2.0], [-1.0, 1.0, 2.0], [-1.0, 1.0, 2.0], [-1.0, 1.0, -2.0]])
    np.testing.assert_array_equal(metrics.spline_hamming(pre), [2, 0, 1])
    h = metrics.spline_density(pre, y)
    np.testing.assert_allclose(h[[0, 2]], [2 / 5.0, 1.0])
    assert np.isnan(h[1])  # no flip over a zero-length step
    # Vectorised over leading axes: same as stacking single curves.
    rng = np.random.default_rng(1)
    pre, mid = rng.normal(size=(2, 3, 6, 10)), rng.normal(size=(2, 3, 6, 4))
    want = np.stack([[np.sum((pre[i, j, 1:] > 0) != (pre[i, j, :-1] > 0), -1)
                      / np.linalg.norm(np.diff(mid[i, j], axis=0), axis=-1)
                      for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(metrics.spline_density(pre, mid), want)


def test_kl_to_endpoints_matches_plain_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 13)) * 3
    kl = metrics.kl_to_endpoints(logits)
    assert kl.shape == (2, 2, 5)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for i in range(2):
        for k in range(5):
            for e, ref in ((0, 0), (1, 4)):
                want = np.sum(p[i, ref] * np.log(p[i, ref] / p[i, k]))
                np.testing.assert_allclose(kl[i, e, k], want, rtol=1e-10, atol=1e-12)
    assert np.all(kl[:, 0, 0] == 0) and np.all(kl[:, 1, -1] == 0)
    assert np.all(kl[:, :, 1:-1] > 0)


def test_sharpness_straight_line_step_and_nonuniform_grid():
    alpha = np.linspace(0, 1, 11)
    assert metrics.sharpness(alpha, alpha) == pytest.approx(1.0)
    # A jump of 0.8 between alpha 0.4 and 0.5 (width 0.1): S = 8, alpha* = 0.45.
    r = np.concatenate([np.linspace(0, 0.1, 5), np.linspace(0.9, 1.0, 6)])
    assert metrics.sharpness(r, alpha) == pytest.approx(8.0)
    assert metrics.boundary(r, alpha) == pytest.approx(0.45)
    # Non-uniform grid: slope uses the real widths.
    grid = np.array([0.0, 0.1, 0.15, 0.6, 1.0])
    curve = np.array([0.0, 0.05, 0.55, 0.6, 1.0])
    assert metrics.sharpness(curve, grid) == pytest.approx(10.0)
    assert metrics.boundary(curve, grid) == pytest.approx(0.125)
    # Vectorised: [layers, steps] -> [layers].
    both = np.stack([alpha, r])
    np.testing.assert_allclose(metrics.sharpness(both, alpha), [1.0, 8.0])
    np.testing.assert_allclose(metrics.boundary(both, alpha), [0.05, 0.45])
    nan_curve = np.full(11, np.nan)
    assert np.isnan(metrics.sharpness(nan_curve, alpha)) and np.isnan(metrics.boundary(nan_curve, alpha))


def test_bad_shapes_and_grids_are_refused():
    with pytest.raises(ValueError, match="n_steps >= 2"):
        metrics.relative_distance(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.sharpness(np.zeros(3), np.array([0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        metrics.sharpness(np.zeros(3), np.linspace(0, 1, 4))
