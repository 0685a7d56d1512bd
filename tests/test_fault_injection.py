"""Issue 10: interrupting experiments.plateaus, experiments.jacobians and experiments.sweep at
several points (SIGINT and SIGKILL; during compute, between writing files, just before and just
after publication) always leaves a consistent complete run: the previous one, or the new one.

The interruption is a signal the process sends itself at a named point
(``PLATEAU_JAX_TEST_INTERRUPT=<point>:<SIGNAL>``, :func:`plateau_jax.files.fault_point`), so the
tests are deterministic. Also: a second script in the same directory leaves the first one's
files alone (defect 2), both scripts feed the same bfloat16 path vectors (defect 12), and a
refused sweep destroys no input file (defect 3)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
CACHE = tempfile.mkdtemp(prefix="plateau_jax_fault_xla_")


def teardown_module():
    shutil.rmtree(CACHE, ignore_errors=True)


def _run(args, interrupt=None):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    env.pop("PLATEAU_JAX_TEST_INTERRUPT", None)
    if interrupt:
        env["PLATEAU_JAX_TEST_INTERRUPT"] = interrupt
    return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _expect(res, interrupt):
    want = {None: 0, "SIGINT": 130, "SIGKILL": -9}[interrupt and interrupt.split(":")[1]]
    assert res.returncode == want, (interrupt, res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr


def _entries(root, name):
    """Directory entries of the script ``name`` in root (its link, versions, temp links)."""
    return sorted(e for e in os.listdir(root) if e == name or e.startswith(f".{name}-")
                  or e.startswith(f".{name}.link"))


def _plateaus_run(root):
    """The published plateaus run, checked complete and self-consistent; returns its steps."""
    out = os.path.join(root, "plateaus")
    cfg = json.load(open(os.path.join(out, "config.json")))["config"]
    with np.load(os.path.join(out, "results.npz")) as z:
        assert z["alpha"].size == cfg["steps"] and z["x"].shape[1] == cfg["steps"]
    figures = ["downstream_layers", "each_interp_layer", "layers_between", "freezing",
               "step_sizes", "spline_density", "summary"]
    assert sorted(os.listdir(out)) == sorted(["config.json", "results.npz"]
                                             + [f"{f}.{cfg['figure_format']}" for f in figures])
    return cfg["steps"]


def _jacobians_run(root):
    out = os.path.join(root, "jacobians")
    cfg = json.load(open(os.path.join(out, "config.json")))["config"]
    want = ["config.json"]
    for label in ("big-in", "big-large"):
        with np.load(os.path.join(out, f"jacobians_{label}.npz")) as z:
            assert z["alpha"].size == cfg["steps"] and z["mlp_fro"].shape[1] == cfg["steps"]
        want += [f"jacobians_{label}.npz"] + [f"{f}_{label}.png" for f in (
            "jac_layers", "jac_products", "jac_cumulative", "jac_cumulative_depth")]
    assert sorted(os.listdir(out)) == sorted(want)
    return cfg["steps"]


def test_interrupted_plateaus_and_jacobians_runs_leave_a_complete_run(tmp_path, plateau_dir):
    root = str(tmp_path / "out")
    model = f"--model={plateau_dir}"
    plateaus = ["experiments.plateaus", model, f"--output_dir={root}", "--dtype=bfloat16",
                "--interp_layers=0", "--distances=1"]
    _expect(_run(plateaus + ["--steps=4"]), None)
    assert _plateaus_run(root) == 4
    version = os.readlink(os.path.join(root, "plateaus"))
    for interrupt in ("compute:SIGKILL", "write:SIGINT", "before-publish:SIGKILL"):
        _expect(_run(plateaus + ["--steps=5", "--overwrite"], interrupt), interrupt)
        assert _plateaus_run(root) == 4, interrupt  # the previous run, untouched
        assert os.readlink(os.path.join(root, "plateaus")) == version
    _expect(_run(plateaus + ["--steps=5", "--overwrite"], "after-publish:SIGKILL"), "x:SIGKILL")
    assert _plateaus_run(root) == 5  # published before the kill; the old version left behind
    _expect(_run(plateaus + ["--steps=6", "--overwrite"]), None)
    assert _plateaus_run(root) == 6
    assert _entries(root, "plateaus") == sorted(["plateaus", os.readlink(os.path.join(root, "plateaus"))])
    config = open(os.path.join(root, "plateaus", "config.json"), "rb").read()

    # experiments.jacobians into the same directory: its own subdirectory (defect 2)
    jac = ["experiments.jacobians", model, f"--output_dir={root}", "--dtype=bfloat16"]
    _expect(_run(jac + ["--steps=6"]), None)
    assert _jacobians_run(root) == 6
    assert open(os.path.join(root, "plateaus", "config.json"), "rb").read() == config
    # both scripts fed the same bfloat16 vectors for the same pair (defect 12)
    with np.load(os.path.join(root, "plateaus", "results.npz")) as p:
        for i, label in enumerate(("big-in", "big-large")):
            with np.load(os.path.join(root, "jacobians", f"jacobians_{label}.npz")) as j:
                np.testing.assert_array_equal(j["x"], p["x"][i])
    version = os.readlink(os.path.join(root, "jacobians"))
    for interrupt in ("compute:SIGINT", "write:SIGKILL"):
        _expect(_run(jac + ["--steps=5", "--overwrite"], interrupt), interrupt)
        assert _jacobians_run(root) == 6, interrupt
        assert os.readlink(os.path.join(root, "jacobians")) == version
    # another configuration without --overwrite: refused before the model loads
    res = _run(jac + ["--steps=5"])
    assert res.returncode == 1 and "Loading" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: {root}/jacobians holds a run with another configuration (steps: 6 (on disk) vs 5")
    _expect(_run(jac + ["--steps=5", "--overwrite"]), None)
    assert _jacobians_run(root) == 5 and _plateaus_run(root) == 6
    assert _entries(root, "jacobians") == sorted(["jacobians", os.readlink(os.path.join(root, "jacobians"))])


def _sweep_consistent(out, shards_expected):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    names = sorted(os.listdir(os.path.join(out, "shards")))
    assert len(names) == shards_expected and all(n.endswith(".npz") for n in names)
    for n in names:
        with np.load(os.path.join(out, "shards", n)) as z:
            assert str(z["config_hash"]) == manifest["config_hash"]
    if os.path.lexists(os.path.join(out, "report")):
        report = os.path.join(out, "report")
        assert sorted(os.listdir(report)) == sorted([
            "config.json", "stats.csv", "summary.csv", "summary.md", "sharpness_by_depth.png",
            "alpha_star_hist.png", "jac_vs_boundary.png"])
        done = json.load(open(os.path.join(report, "config.json")))["completeness"]
        assert done["shards"] == shards_expected
        return done
    return None


def test_interrupted_sweep_and_report_and_refused_sweep(tmp_path, plateau_dir):
    out = str(tmp_path / "sweep")
    sweep = ["experiments.sweep", f"--model={plateau_dir}", "--generate=random",
             "--n_pairs=10", "--seed=0", "--n_steps=8", "--tol=0.01", "--sharpness_width=0.05",
             "--batch_size=4", f"--output_dir={out}"]
    _expect(_run(sweep, "compute:SIGINT"), "compute:SIGINT")  # after the first shard
    assert _sweep_consistent(out, 1) is None
    inputs = {n: open(os.path.join(out, n), "rb").read()
              for n in ("input_pairs.jsonl", "generator_skipped.jsonl")}
    _expect(_run(sweep, "before-publish:SIGKILL"), "before-publish:SIGKILL")  # in the report
    assert _sweep_consistent(out, 3) is None and not os.path.lexists(os.path.join(out, "report"))
    assert [e for e in os.listdir(out) if e.startswith(".report-")]  # the killed report's stage
    report = ["experiments.sweep_report", f"--output_dir={out}"]
    _expect(_run(report), None)
    assert _sweep_consistent(out, 3)["complete"]
    assert _entries(out, "report") == sorted(["report", os.readlink(os.path.join(out, "report"))])
    first = os.readlink(os.path.join(out, "report"))
    _expect(_run(report, "before-publish:SIGINT"), "x:SIGINT")
    assert _sweep_consistent(out, 3)["complete"] and os.readlink(os.path.join(out, "report")) == first
    _expect(_run(report, "after-publish:SIGKILL"), "x:SIGKILL")
    assert _sweep_consistent(out, 3)["complete"] and os.readlink(os.path.join(out, "report")) != first

    # a different generator seed is refused before the model loads; no input file changes
    res = _run(sweep[:-1] + ["--seed=1", f"--output_dir={out}"])
    assert res.returncode == 1 and "Loading" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: '{out}' holds a sweep with a different configuration; refusing to mix results. "
        "Differences: input.seed: 0 (on disk) vs 1 (now).")
    assert inputs == {n: open(os.path.join(out, n), "rb").read() for n in inputs}
    assert _sweep_consistent(out, 3)["complete"]
