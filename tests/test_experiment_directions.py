"""experiments.directions and experiments.slices end to end on the shipped model, and their errors
(subprocesses: the one-line ``error:`` and the exit status are what a user sees)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from plateau_jax.plotting import directions as dplot
from plateau_jax.plotting import slices as splot
from plateau_jax.plotting.plateaus import load_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--n_base=6", "--n_directions=2", "--n_lengths=6", "--sensitive_steps=3",
        "--sensitive_restarts=2", "--reference_max_prompts=300", "--batch_size=4"]


def _run(module, *args):
    env = dict(os.environ, PLATEAU_JAX_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_directions_writes_every_file(tmp_path):
    out = tmp_path / "run"
    p = _run("experiments.directions", f"--output_dir={out}", *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    out = out / "directions"  # the published run
    for name in ["config.json", "reference.npz", "reference_activations.npy", "results.npz",
                 "summary.md"] + [f + ".png" for f in dplot.FIGURES]:
        assert (out / name).stat().st_size > 0, name
    res = load_results(str(out / "results.npz"))
    B, T, L = 6, 6, 6
    M = 5 * 2 + 1 + 1 + 1  # five per-base types, one mixture, sensitive, steering
    assert res["kl"].shape == (B, M, T) and res["rel_distance"].shape == (B, M, T, L + 1)
    assert res["threshold"].shape == (B, M) and res["sharpness"].shape == (B, M, L + 1)
    assert list(res["type_names"]) == ["real", "random", "matched", "cov_diff", "cov_sample",
                                       "mixture", "sensitive", "steering"]
    assert res["summary_kl_median"].shape == (8, T) and res["sensitive_trace"].shape == (B, 2, 3)
    np.testing.assert_allclose(res["kl"][..., 0], 0.0, atol=1e-5)  # t = 0 is unperturbed
    assert "| sensitive |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_slices_writes_every_file(tmp_path):
    out = tmp_path / "run"
    p = _run("experiments.slices", f"--output_dir={out}", "--grid=8",
             "--reference_max_prompts=300")
    assert p.returncode == 0, p.stderr[-3000:]
    out = out / "slices"  # the published run
    for name in ["config.json", "slices.npz"] + [f + ".png" for f in splot.FIGURES]:
        assert (out / name).stat().st_size > 0, name
    res = load_results(str(out / "slices.npz"))
    assert res["top"].shape == (8, 8) and res["kl"].shape == (3, 8, 8)
    np.testing.assert_allclose(res["anchor_coords"][0], [0.0, 0.0])




_FOUR = """
import sys
import numpy as np
import jax
assert jax.device_count() == 4, jax.devices()
import plateau_jax as pj
from plateau_jax.plateaus import directions as D, reference as R
m = pj.load_gpt2(sys.argv[1])
prompts = [np.asarray(p, np.int32) for p in {prompts!r}]
base = R.collect_activations(m, prompts, 1, "resid_pre", batch_size=3)
u = np.asarray(D.random_directions(jax.random.PRNGKey(0), len(prompts), 3, m.config.d_model))
res = D.perturbation_responses(m, prompts, base, u, [0.0, 0.5, 1.0], 1, "resid_pre", 2.0,
                               batch_size=3)
sens = D.find_sensitive_directions(m, prompts, base, 1, "resid_pre", 2.0, length=0.5, restarts=2,
                                   steps=5, batch_size=3)
np.savez(sys.argv[2], base=base, kl=res.kl, dist=res.dist, sens=sens.directions)
"""


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path, plateau_dir, plateau_model):
    """Collection, responses and the sensitive search sharded over 4 (simulated) devices, with a
    batch that does not divide evenly, equal the single-device results."""
    import jax

    import plateau_jax as pj
    from plateau_jax.plateaus import directions as D, reference as R

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 400, n).tolist() for n in (3, 5, 4, 6, 2, 5, 3)]
    path = str(tmp_path / "four.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PLATEAU_JAX_NO_PROGRESS="1")
    p = subprocess.run([sys.executable, "-c", _FOUR.format(prompts=prompts),
                        plateau_dir, path], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = plateau_model
    prompts = [np.asarray(q, np.int32) for q in prompts]
    base = R.collect_activations(m, prompts, 1, "resid_pre", batch_size=3)
    u = np.asarray(D.random_directions(jax.random.PRNGKey(0), len(prompts), 3, m.config.d_model))
    res = D.perturbation_responses(m, prompts, base, u, [0.0, 0.5, 1.0], 1, "resid_pre", 2.0,
                                   batch_size=3)
    sens = D.find_sensitive_directions(m, prompts, base, 1, "resid_pre", 2.0, length=0.5,
                                       restarts=2, steps=5, batch_size=3)
    with np.load(path) as z:
        np.testing.assert_allclose(z["base"], base, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["kl"], res.kl, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(z["dist"], res.dist, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(z["sens"], sens.directions, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("module,flagfile,extra", [
    ("experiments.directions", "directions_gpt2_small.flags",
     ["--n_base=4", "--n_directions=2", "--n_lengths=4", "--types=real,random,sensitive",
      "--sensitive_steps=2", "--reference_max_prompts=200"]),
    ("experiments.slices", "slices_gpt2_small.flags", ["--grid=4", "--reference_max_prompts=200"]),
])
def test_gpt2_small_flagfiles_run(tmp_path, module, flagfile, extra):
    """The GPT-2-small flagfiles parse and run (on the shipped model: no download in tests)."""
    out = tmp_path / "run"
    p = _run(module, f"--flagfile=experiments/flags/{flagfile}", "--model=tiny-plateau",
             f"--output_dir={out}", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((out / module.split(".")[1] / "config.json").read_text())["config"]
    assert (cfg["layer"], cfg["site"]) == (1, "resid_pre")
