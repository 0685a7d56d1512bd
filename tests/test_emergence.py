"""experiments.emergence: its MLP Jacobian norms, one pair on the shipped model, and emergence
over hub revisions of one model resolved from a local cache laid out as the hub's."""

import os

import jax
import numpy as np
import pytest

import plateau_jax
from experiments import emergence
from plateau_jax import testing
from plateau_jax.plateaus import paths
from plateau_jax.plateaus import prompts


def test_mlp_jacobian_norms_match_finite_differences(tiny_model):
    model = tiny_model
    x = np.random.default_rng(0).normal(size=(3, model.config.n_embd)).astype(np.float32)
    norms = emergence.mlp_jacobian_norms(model, 1, x)
    blk = model.block(1)
    import jax
    import jax.numpy as jnp
    from plateau_jax.model.layers import mlp_part

    def mlp_out(v):
        return mlp_part(blk, v[None, None], model.config)[0, 0]

    eps = 1e-2
    eye = jnp.eye(model.config.n_embd, dtype=jnp.float32)
    batched = jax.jit(jax.vmap(mlp_out))
    for i in range(3):
        fd = float(np.linalg.norm((batched(x[i] + eps * eye) - batched(x[i] - eps * eye)) / (2 * eps)))
        assert norms[i] == pytest.approx(fd, rel=2e-2)


@pytest.mark.slow
def test_one_pair_on_the_shipped_model():
    model = plateau_jax.load_gpt2("tiny-plateau")
    pair = prompts.encode_pair(model.tokenizer, "The house was", " big", " in",
                               model.config.n_positions)
    alpha = paths.alpha_grid(8)
    res = emergence.analyse_pair(model, pair, 0, alpha, "slerp")
    r = np.asarray(res["r"])
    assert r[0] == 0.0 and r[-1] == pytest.approx(1.0)
    assert 1.0 <= res["S"] < 3.0  # no plateau in this small model (README)
    assert sorted(res["jacobian"], key=int) == [1, 2, 3, 4, 5]
    assert all(len(v["norms"]) == 8 and v["contrast"] >= 1.0 for v in res["jacobian"].values())


def hub_cache(root, repo, snapshots):
    """An HF hub cache holding ``repo`` with one snapshot per revision (``{revision: source
    directory}``, each under its own commit hash and ``refs/{revision}``), as huggingface_hub
    lays it out."""
    import shutil

    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    for j, (rev, src) in enumerate(snapshots.items()):
        sha = f"{j + 1:040x}"
        shutil.copytree(src, base / "snapshots" / sha)
        (base / "refs" / rev).write_text(sha)
    return str(root / "hub")


@pytest.fixture(scope="module")
def pythia_like(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-NeoX model at three 'training steps' (different weights) in a hub cache."""
    root = tmp_path_factory.mktemp("revisions")
    dirs = {}
    for j, rev in enumerate(("step0", "step512", "step1000")):
        dirs[rev] = str(root / rev)
        testing.make_checkpoint(dirs[rev], testing.tiny_neox_config(), seed=j, tokenizer=tiny_tokenizer,
                                scale=1.0 + 2 * j)
    repo = "test-org/pythia-tiny"
    return repo, hub_cache(root, repo, {**dirs, "main": dirs["step1000"]}), dirs


@pytest.mark.slow
def test_revisions_resolve_against_a_local_hub_cache(pythia_like):
    repo, cache, dirs = pythia_like
    for rev in ("step512", "main"):
        got = plateau_jax.load_model(repo, revision=rev, cache_dir=cache)
        want = plateau_jax.load_model(dirs["step1000" if rev == "main" else rev])
        assert got.config == want.config and got.config.family == "gpt_neox"
        assert all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)))
    with pytest.raises(plateau_jax.CheckpointError, match="step7"):
        plateau_jax.load_model(repo, revision="step7", cache_dir=cache)


@pytest.mark.slow
def test_emergence_over_revisions(pythia_like, tmp_path):
    repo, cache, dirs = pythia_like
    ckpts = emergence.revision_checkpoints(repo, ["step1000", "step0", "step512"])
    assert [c[0] for c in ckpts] == [0, 512, 1000]
    res = emergence.run(ckpts, ["The house was"], "big:in,big:large", n_steps=6, cache_dir=cache)
    assert [c["revision"] for c in res["checkpoints"]] == ["step0", "step512", "step1000"]
    alpha = paths.alpha_grid(6)
    for c in res["checkpoints"]:  # each revision's numbers are its own weights'
        model = plateau_jax.load_model(dirs[c["revision"]])
        pair = prompts.encode_pair(model.tokenizer, "The house was", " big", " in",
                                   model.config.n_positions)
        want = emergence.analyse_pair(model, pair, 0, alpha, "slerp")
        np.testing.assert_allclose(c["pairs"][0]["r"], want["r"], atol=1e-6)
        assert c["pairs"][0]["boundary_alpha"] == pytest.approx(want["boundary_alpha"])
        assert sorted(c["pairs"][0]["jacobian"], key=int) == [1, 2]
    S = [row["S"]["median"] for row in res["summary"]]
    assert len(set(S)) == 3  # different weights, different sharpness
    for row in res["summary"]:
        assert row["boundary_alpha"]["q1"] <= row["boundary_alpha"]["median"] <= row["boundary_alpha"]["q3"]
    from plateau_jax.plotting import emergence as emergence_plots

    emergence_plots.save_all(res, str(tmp_path), model_name=repo)
    assert (tmp_path / "emergence.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="trailing step"):
        emergence.revision_checkpoints(repo, ["main"])


@pytest.mark.slow
def test_emergence_command_over_revisions(pythia_like, tmp_path):
    import json
    import subprocess
    import sys

    repo, cache, _ = pythia_like
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.emergence", f"--model={repo}",
         "--revisions=step0,step1000", f"--cache_dir={cache}", f"--output_dir={out}",
         "--contexts=The house was", "--pairs=big:in", "--n_steps=5"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PLATEAU_JAX_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = out / "emergence"  # the published run
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert [(r["step"], r["revision"]) for r in summary] == [(0, "step0"), (1000, "step1000")]
    assert (out / "emergence.png").exists() and (out / "results.json").exists()
