"""Interpolation paths: slerp with norm rescaling (endpoints, norms, obtuse angles), linear."""

import numpy as np
import pytest

from plateau_jax.plateaus import paths
from plateau_jax.plateaus.interpolation import check_alpha


def _numpy_slerp(a, b, alpha):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    theta = np.arccos(np.clip(a @ b / (na * nb), -1, 1))
    out = []
    for t in alpha:
        u = (np.sin((1 - t) * theta) * a / na + np.sin(t * theta) * b / nb) / np.sin(theta)
        out.append(u * ((1 - t) * na + t * nb))
    return np.array(out)


@pytest.mark.parametrize("cos_sign", [1.0, -1.0])
def test_slerp_endpoints_norms_and_angles(cos_sign):
    rng = np.random.default_rng(0)
    a = rng.normal(size=16)
    b = cos_sign * 0.7 * a / np.linalg.norm(a) * 3.0 + rng.normal(size=16)
    b *= 2.5
    assert np.sign(a @ b) == cos_sign  # acute and obtuse cases
    alpha = paths.alpha_grid(21)
    x = np.asarray(paths.slerp(a.astype(np.float32), b.astype(np.float32), alpha))
    assert x.shape == (21, 16)
    np.testing.assert_allclose(x[0], a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[-1], b, rtol=1e-5, atol=1e-5)  # the study's |cos| missed b here
    norms = np.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(norms, (1 - alpha) * np.linalg.norm(a) + alpha * np.linalg.norm(b),
                               rtol=1e-5)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    theta = np.arccos(cos(a, b))
    angles = np.array([np.arccos(np.clip(cos(a, v), -1, 1)) for v in x])
    np.testing.assert_allclose(angles, alpha * theta, atol=2e-3)  # the angle moves evenly
    np.testing.assert_allclose(x, _numpy_slerp(a, b, alpha), rtol=1e-4, atol=1e-4)


def _study_slerp(a, b, alpha):
    """The study's formula with theta = arccos(|a^.b^|) (its defect), in plain numpy."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    theta = np.arccos(abs(a @ b) / (na * nb))
    return np.array([(np.sin((1 - t) * theta) * a / na + np.sin(t * theta) * b / nb)
                     / np.sin(theta) * ((1 - t) * na + t * nb) for t in alpha])


def test_study_abs_cos_formula_differs_only_for_obtuse_angles():
    alpha = np.linspace(0, 1, 11)
    acute_a, acute_b = np.array([1.0, 0.2, 0.0]), np.array([0.3, 1.0, 0.1])
    np.testing.assert_allclose(np.asarray(paths.slerp(acute_a, acute_b, alpha)).astype(float),
                               _study_slerp(acute_a, acute_b, alpha), rtol=1e-5, atol=1e-6)
    a, b = np.array([1.0, 0.2, 0.0]), np.array([-1.0, 0.5, 0.1])
    ours, study = np.asarray(paths.slerp(a, b, alpha)), _study_slerp(a, b, alpha)
    blended = (1 - alpha) * np.linalg.norm(a) + alpha * np.linalg.norm(b)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), blended, rtol=1e-5)
    # The |cos| version leaves the great circle: its mid-path directions are not unit vectors,
    # so its points do not have the intended norms (nor the intended angles).
    assert np.max(np.abs(np.linalg.norm(study, axis=-1) - blended)) > 0.3


def test_linear_path_and_batching():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3, 5)).astype(np.float32)
    alpha = np.array([0.0, 0.1, 0.7, 1.0])  # non-uniform grids are fine
    x = np.asarray(paths.interpolate(a, b, alpha, "linear"))
    assert x.shape == (3, 4, 5)
    for i in range(3):
        for k, t in enumerate(alpha):
            np.testing.assert_allclose(x[i, k], a[i] + t * (b[i] - a[i]), rtol=1e-6, atol=1e-6)
    s = np.asarray(paths.interpolate(a, b, alpha, "slerp"))
    for i in range(3):
        np.testing.assert_allclose(s[i], _numpy_slerp(a[i], b[i], alpha), rtol=1e-4, atol=1e-5)


def test_bad_paths_and_grids():
    with pytest.raises(ValueError, match="Unknown path 'spline'"):
        paths.interpolate(np.ones(3), np.zeros(3), np.array([0.0, 1.0]), "spline")
    with pytest.raises(ValueError, match="at least 2"):
        paths.alpha_grid(1)
    for bad in ([0.0, 0.5], [0.1, 1.0], [0.0, 0.6, 0.4, 1.0], [0.0]):
        with pytest.raises(ValueError, match="alpha grid"):
            check_alpha(bad)
    np.testing.assert_array_equal(check_alpha([0, 0.2, 1]), [0, 0.2, 1])
