"""The README's commands: the main job runs end to end on the shipped model, offline, and CI
runs exactly the README's test command."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command_after(marker: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(re.escape(marker) + r"\s*```bash\n(.+?)\n```", text, re.S)
    assert block, f"README has no command after {marker}"
    return block.group(1).strip()


@pytest.mark.slow
def test_main_job_command_runs_offline_on_the_shipped_model(tmp_path):
    cmd = _command_after("<!-- main-command -->")
    job = cmd.split("&&")[-1].strip()  # the set-up steps before it are what CI does anyway
    assert job.startswith("python -m experiments.plateaus")
    out = tmp_path / "demo"
    job = re.sub(r"--output_dir=\S+", f"--output_dir={out}", job).split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PLATEAU_JAX_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable] + job[1:], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / "plateaus"  # the script's published run (README: output layout)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["model"] == "tiny-plateau"
    with np.load(run / "results.npz") as r:
        assert r["r_logits"].shape == (2, 50)
        np.testing.assert_allclose(r["r_logits"][:, [0, -1]], [[0, 1], [0, 1]], atol=1e-12)
    assert len(list(run.glob("*.png"))) == 7
    assert f"results: {run}/results.npz" in res.stdout


def test_ci_runs_the_readme_test_command():
    cmd = _command_after("<!-- test-command -->")
    assert "pip install torch==2.13.0" in cmd and cmd.endswith("python -m pytest")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "<!-- test-command -->" in ci and 'bash -c "$cmd"' in ci
