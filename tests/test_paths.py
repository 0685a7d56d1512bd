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


# ----------------------------------------------------------------------------- issue 10

def _rotation_path(a, b, alpha):
    """Independent float64 reference: rotate a^ towards b^ in their plane (Gram-Schmidt),
    x = (cos(t theta) a^ + sin(t theta) u^) ((1-t)|a| + t|b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ah, bh = a / na, b / nb
    u = bh - (ah @ bh) * ah
    theta = np.arctan2(np.linalg.norm(u), ah @ bh)
    u /= np.linalg.norm(u)
    return np.array([(np.cos(t * theta) * ah + np.sin(t * theta) * u) * ((1 - t) * na + t * nb)
                     for t in alpha])


def _at_angle(degrees, d=192, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=d) * 10
    u = rng.normal(size=d)
    u -= u @ a / (a @ a) * a
    u /= np.linalg.norm(u)
    t = np.radians(degrees)
    return a, (np.cos(t) * a / np.linalg.norm(a) + np.sin(t) * u) * 7.0


@pytest.mark.parametrize("degrees", [1e-4, 30.0, 120.0, 179.0, 179.9])
def test_slerp_matches_float64_reference_up_to_near_antiparallel(degrees):
    """Issue 10, defect 11: the host path is float64-exact; the device (float32) slerp keeps the
    norms (the arccos version lost 7.8% of the norm at 179.9 degrees)."""
    a, b = _at_angle(degrees)
    alpha = paths.alpha_grid(50)
    ref = _rotation_path(a, b, alpha)
    np.testing.assert_allclose(paths.interpolate_host(a, b, alpha), ref, rtol=1e-9, atol=1e-9)
    x32 = np.asarray(paths.slerp(a.astype(np.float32), b.astype(np.float32), alpha), np.float64)
    assert np.abs(x32 - ref).max() / np.abs(ref).max() < 2e-4
    blended = (1 - alpha) * np.linalg.norm(a) + alpha * np.linalg.norm(b)
    np.testing.assert_allclose(np.linalg.norm(x32, axis=-1), blended, rtol=2e-4)
    assert float(paths.angle(a.astype(np.float32), b.astype(np.float32))) == pytest.approx(
        np.radians(degrees), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("degrees", [180.0, 179.95])
def test_antiparallel_endpoints_are_refused(degrees):
    """Exactly and nearly antiparallel (within ANTIPARALLEL_TOL = 1e-3 rad of pi): the host
    path raises naming the angle and the tolerance; the device path is NaN, never the old path
    that jumped from +a to -a between two steps (a fake boundary)."""
    a, b = _at_angle(degrees)
    if degrees == 180.0:
        b = -0.7 * a
    alpha = paths.alpha_grid(50)
    with pytest.raises(paths.AntiparallelError) as e:
        paths.interpolate_host(a, b, alpha, "slerp")
    assert f"{degrees:.4f} degrees apart, within 0.001 rad (0.0573 degrees) of antiparallel" in str(e.value)
    assert "--path=linear" in str(e.value)
    assert np.isnan(np.asarray(paths.slerp(a.astype(np.float32), b.astype(np.float32), alpha))).all()
    x = paths.interpolate_host(a, b, alpha, "linear")  # the linear path is defined
    np.testing.assert_allclose(x[[0, -1]], [a, b])
    with pytest.raises(ValueError, match="zero vector"):
        paths.interpolate_host(np.zeros(4), np.ones(4), alpha)


def test_batched_refusal_names_the_pair():
    a = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    b = np.array([[0.0, 1.0, 0.0], [-2.0, 0.0, 0.0]])
    with pytest.raises(paths.AntiparallelError, match=r"endpoints \(pair 1\) are 180.0000 degrees"):
        paths.interpolate_host(a, b, np.linspace(0, 1, 3))


@pytest.mark.parametrize("dtype,unit", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_low_precision_paths_differ_from_float64_only_by_the_final_rounding(dtype, unit):
    """Issue 10, defect 12: a path built in float64 and cast once is within one rounding of the
    exact path; built in the model dtype (as experiments.jacobians did) it was not."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    a = rng.normal(size=1280) * 3
    b = rng.normal(size=1280) * 3 + 0.5 * a
    dt = jnp.dtype(dtype)
    a, b = (np.asarray(np.asarray(v).astype(dt), np.float64) for v in (a, b))  # model-dtype endpoints
    alpha = paths.alpha_grid(50)
    ref = _rotation_path(a, b, alpha)
    x = np.asarray(paths.interpolate_host(a, b, alpha, dtype=dt), np.float64)
    assert np.all(np.abs(x - ref) <= unit * np.abs(ref) + 1e-30)
    in_dtype = np.asarray(paths.interpolate(jnp.asarray(a, dt), jnp.asarray(b, dt), alpha), np.float64)
    assert np.any(np.abs(in_dtype - ref) > 2 * unit * np.abs(ref))


def test_interpolation_run_feeds_the_float64_path_and_refuses_antiparallel(tiny_model):
    from plateau_jax import run_prefix
    from plateau_jax.plateaus import interpolation
    prefix = run_prefix(tiny_model, tiny_model.to_tokens("The house was"))
    a, b = _at_angle(179.9, d=tiny_model.config.n_embd)
    alpha = paths.alpha_grid(7)
    run = interpolation.interpolation_run(tiny_model, prefix, a, b, 0, alpha, components=())
    np.testing.assert_array_equal(np.asarray(run.x), _rotation_path(a, b, alpha).astype(np.float32))
    with pytest.raises(paths.AntiparallelError):
        interpolation.interpolation_run(tiny_model, prefix, a, -a, 0, alpha, components=())
