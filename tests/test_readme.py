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


def _python_after(marker: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(re.escape(marker) + r"\s*```python\n(.+?)\n```", text, re.S)
    assert block, f"README has no python block after {marker}"
    return block.group(1)


def test_readme_api_tour_runs_and_its_comments_hold(capsys):
    """The README's library tour runs as printed (on the shipped model) and does what its
    comments say: r goes from 0 to 1, the Jacobian norms are [n_layer - 1, 50], the frozen MLP
    and the swapped block change the logits."""
    scope: dict = {}
    exec(compile(_python_after("<!-- api-tour -->"), "README.md", "exec"), scope)
    model, r = scope["model"], scope["r"]
    assert r.shape == (50,) and abs(r[0]) < 1e-12 and abs(r[-1] - 1) < 1e-12
    assert scope["jac"]["mlp_fro"].shape == (model.config.n_layer - 1, 50)
    T = len(scope["ids"])
    assert scope["logits"].shape == (1, T, model.config.vocab_size)
    for changed in ("patched", "swapped"):
        assert np.abs(np.asarray(scope[changed]) - np.asarray(scope["logits"])).max() > 1e-3
    assert "sharpness S = " in capsys.readouterr().out


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_and_image_in_the_docs_exists():
    """Relative links and images of README.md and docs/*.md point at files that exist, and
    their #anchors at headings of the target."""
    pages = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(
        os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    broken = []
    for page in pages:
        with open(os.path.join(ROOT, page)) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path \
                else os.path.join(ROOT, page)
            if not os.path.exists(full):
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and full.endswith(".md"):
                with open(full) as f:
                    heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
                if anchor not in heads:
                    broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
