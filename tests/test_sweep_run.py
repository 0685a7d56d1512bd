"""Sweep runs on disk: kill and resume, 1 vs 8 simulated devices, config mismatch, bad pairs."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax.sweep import inputs, pair_stats, runner

from sweep_helpers import BATCH, CACHE_DIR, ROOT, SPEC, batch, one_device_engine, run_py

ROWS = [{"context": c, "ending_a": a, "ending_b": b}
        for c, (a, b) in zip(["The house was", "The cat sat on the", "It is", "The man was",
                              "The car was", "She was", "The sky is", "A dog was", "The house was",
                              "They were"],
                             [(" big", " in"), (" big", " large"), (" red", " small"), (" happy", " tall"),
                              (" red", " fast"), (" happy", " here"), (" blue", " red"), (" small", " big"),
                              (" large", " old"), (" here", " there")])]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, "{not json")                                                       # line 4
    lines.insert(6, json.dumps({"context": "The house was", "ending_a": " bigxyzzy",
                                "ending_b": " in"}))                                   # line 7
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cmd(model_dir, pairs_path, out):
    return [sys.executable, "-m", "experiments.sweep", f"--model={model_dir}",
            f"--pairs_file={pairs_path}", "--layers=0", f"--n_steps={SPEC.n_steps}",
            f"--tol={SPEC.tol}", f"--sharpness_width={SPEC.sharpness_width}",
            f"--refine={SPEC.refine}",
            f"--batch_size={BATCH}", f"--output_dir={out}"]


# The input part of the configuration the script records for a --pairs_file sweep.
PAIRS_FILE_INPUT = {"input": {"max_pairs": None, "source": "pairs_file"}}


def _shards(out):
    d = os.path.join(out, "shards")
    return sorted(n for n in os.listdir(d) if n.endswith(".npz")) if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(tiny_dir, tiny_model, pairs_file, tmp_path):
    killed = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR)
    env.pop("XLA_FLAGS", None)
    # SIGKILL right after the first shard is written (plateau_jax.files.fault_point)
    res = subprocess.run(_cmd(tiny_dir, pairs_file, killed), cwd=ROOT, capture_output=True,
                         text=True, timeout=240,
                         env=dict(env, PLATEAU_JAX_TEST_INTERRUPT="compute:SIGKILL"))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    partial = _shards(killed)
    assert partial == ["L00_b000000.npz"], partial
    res = subprocess.run(_cmd(tiny_dir, pairs_file, killed), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][0])[
        "computed_pairs"] == 10 - 4 * len(partial)

    # the same sweep uninterrupted, in this process
    clean = str(tmp_path / "clean")
    rows, errors = inputs.read_pairs_file(pairs_file)
    pairs, enc_errors = inputs.encode_rows(tiny_model.tokenizer, rows, tiny_model.config.n_positions)
    summary = runner.run_sweep(tiny_model, pairs, SPEC, clean, batch_size=BATCH,
                               input_errors=errors + enc_errors, extra_config=PAIRS_FILE_INPUT,
                               engine=one_device_engine(tiny_model))
    assert summary["computed_pairs"] == 10
    assert _shards(clean) == _shards(killed) == [f"L00_b{i:06d}.npz" for i in range(3)]
    for name in _shards(clean):
        with np.load(os.path.join(clean, "shards", name)) as a, \
                np.load(os.path.join(killed, "shards", name)) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
    for f in ("errors.jsonl", "pairs.jsonl"):
        assert open(os.path.join(clean, f)).read() == open(os.path.join(killed, f)).read()
    errs = [json.loads(l) for l in open(os.path.join(killed, "errors.jsonl"))]
    assert [e["line"] for e in errs] == [4, 7]
    assert "invalid JSON" in errs[0]["reason"] and "not exactly one token" in errs[1]["reason"]
    # the report of the resumed run
    for f in ("summary.md", "summary.csv", "stats.csv", "sharpness_by_depth.png"):
        assert os.path.getsize(os.path.join(killed, "report", f)) > 0
    summ = open(os.path.join(killed, "report", "summary.csv")).read().splitlines()
    assert len(summ) == 1 + 3  # header + targets 1, 2, logits
    assert len(open(os.path.join(killed, "report", "stats.csv")).read().splitlines()) == 1 + 10 * 3

    # another configuration in the same directory is refused before any work
    from plateau_jax.sweep import SweepSpec
    with pytest.raises(runner.ConfigMismatchError, match="n_steps"):
        runner.run_sweep(tiny_model, pairs, SweepSpec(layers=(0,), n_steps=9, tol=SPEC.tol), clean,
                         batch_size=BATCH, extra_config=PAIRS_FILE_INPUT)


_EIGHT = r"""
import sys, numpy as np, jax
sys.path.insert(0, "tests")
assert jax.device_count() == 8, jax.devices()
import plateau_jax as pj
from sweep_helpers import batch, SPEC, BATCH
from plateau_jax.sweep import SweepEngine
m = pj.load_gpt2(sys.argv[1] if len(sys.argv) > 1 else {model!r})
_, ids, lengths, ta, tb = batch(m, BATCH)
e = SweepEngine(m, SPEC)
assert e.n_devices == 8
out = e.run(0, ids, lengths, ta, tb)
np.savez({out!r}, **out)
"""


@pytest.mark.slow
def test_eight_devices_equal_one(tiny_dir, tiny_model, tmp_path):
    path = str(tmp_path / "eight.npz")
    res = run_py(_EIGHT.format(model=tiny_dir, out=path),
                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert res.returncode == 0, res.stderr[-3000:]
    _, ids, lengths, ta, tb = batch(tiny_model, BATCH)
    one = one_device_engine(tiny_model).run(0, ids, lengths, ta, tb, pad_to=BATCH)
    with np.load(path) as z:
        eight = dict(z)
    assert sorted(one) == sorted(eight)
    for k in one:
        if one[k].dtype.kind in "biu":
            np.testing.assert_array_equal(one[k], eight[k], err_msg=k)
        else:
            np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    s1, s8 = pair_stats(one, SPEC.alpha), pair_stats(eight, SPEC.alpha)
    for k in s1:
        np.testing.assert_allclose(s8[k], s1[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_failing_pair_is_reported_not_fatal():
    class Flaky:  # fails any batch containing token 13
        def run(self, layer, ids, lengths, ta, tb, pad_to=None):
            if 13 in ta:
                raise FloatingPointError("boom")
            return {"r": np.ones((len(ids), 2, 3)), "finite": np.ones(len(ids), bool)}

    ta = np.array([1, 13, 2])
    out, failed = runner._run_batch(Flaky(), 0, np.zeros((3, 4)), np.ones(3), ta, ta, 4)
    assert list(failed) == [1] and "boom" in failed[1]
    assert np.isnan(out["r"][1]).all() and np.isfinite(out["r"][[0, 2]]).all()
    assert not out["finite"][1]


# ----------------------------------------------------------------------------- issue 10

def _pairs(model, n=10):
    rows = [inputs.PairRow(r["context"], r["ending_a"], r["ending_b"], i + 1)
            for i, r in enumerate(ROWS[:n])]
    pairs, errors = inputs.encode_rows(model.tokenizer, rows, model.config.n_positions)
    assert not errors
    return pairs


class _AllFail:
    """A real engine whose every pair comes back non-finite."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, *args, **kw):
        out = self.engine.run(*args, **kw)
        out["finite"] = np.zeros_like(out["finite"])
        return out


def _summary_csv(out):
    import csv
    with open(os.path.join(out, "report", "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_report_when_every_pair_fails(tiny_model, tmp_path):
    """Issue 10, defect 10: figures and a summary that says so, depth column right."""
    from plateau_jax.sweep import report
    out = str(tmp_path / "s")
    pairs = _pairs(tiny_model, 4)
    runner.run_sweep(tiny_model, pairs, SPEC, out, batch_size=BATCH, show_progress=False,
                     engine=_AllFail(one_device_engine(tiny_model)))
    paths = report.write_report(out)
    for name in ("sharpness_by_depth.png", "alpha_star_hist.png", "jac_vs_boundary.png"):
        assert os.path.getsize(paths[name]) > 0
    md = open(paths["summary.md"]).read()
    assert "**Every pair failed** (4 (pair, layer) results" in md
    rows = _summary_csv(out)
    assert [(r["target"], r["depth"], r["n"], r["n_failed"], r["n_expected"]) for r in rows] == [
        ("1", "1", "0", "4", "4"), ("2", "2", "0", "4", "4"), ("logits", "logits", "0", "4", "4")]
    errs = [json.loads(l) for l in open(os.path.join(out, "errors.jsonl"))]
    assert len(errs) == 4 and all("non-finite values interpolating at layer 0" in e["reason"]
                                  and "float32" in e["reason"] for e in errs)


def test_report_of_a_partial_sweep_says_it_is_incomplete(tiny_model, tmp_path):
    from plateau_jax.sweep import report
    out = str(tmp_path / "s")
    runner.run_sweep(tiny_model, _pairs(tiny_model), SPEC, out, batch_size=BATCH,
                     show_progress=False, engine=one_device_engine(tiny_model))
    full = report.write_report(out, figures=False)
    assert full["complete"] == "yes" and "Incomplete" not in open(full["summary.md"]).read()
    first = os.readlink(os.path.join(out, "report"))
    for i in (1, 2):  # as if killed after the first shard
        os.unlink(runner.shard_path(out, 0, i))
    paths = report.write_report(out, figures=False)
    assert paths["complete"] == "no: 4 of 10 (pair, layer) results"
    md = open(paths["summary.md"]).read()
    assert "**Incomplete sweep: 1 of 3 shards, 4 of 10 (pair, layer) results present." in md
    assert {r["n"] for r in _summary_csv(out)} == {"4"}
    assert {r["n_expected"] for r in _summary_csv(out)} == {"10"}
    # published atomically: a new version directory, the previous one removed
    assert os.readlink(os.path.join(out, "report")) != first
    assert not os.path.exists(os.path.join(out, first))


def test_antiparallel_endpoints_fail_with_the_angle_and_tolerance(tiny_model, tmp_path):
    """Issue 10, defect 11: in the sweep engine (float32, on device) endpoints at 180 degrees
    are refused, not turned into a fake boundary; the reason names angle and tolerance."""
    from plateau_jax.sweep import SweepEngine, make_mesh
    pairs = _pairs(tiny_model, 2)
    # Block 0 writes nothing, positions embed to 0, and token B embeds to -token A: layer 0's
    # resid_post of the first pair's endpoints is exactly antiparallel.
    params = jax.tree_util.tree_map(np.array, tiny_model.params)
    for name in ("attn", "mlp"):
        params["blocks"][name]["W_O" if name == "attn" else "W_out"][0] = 0
        params["blocks"][name]["b_O" if name == "attn" else "b_out"][0] = 0
    params["pos_embed"]["W_pos"][:] = 0
    ta, tb = pairs[0][1].token_a, pairs[0][1].token_b
    params["embed"]["W_E"][tb] = -params["embed"]["W_E"][ta]
    model = tiny_model.replace(params=jax.tree_util.tree_map(jax.numpy.asarray, params))
    out = str(tmp_path / "s")
    runner.run_sweep(model, pairs, SPEC, out, batch_size=BATCH, show_progress=False,
                     engine=SweepEngine(model, SPEC, mesh=make_mesh(jax.devices()[:1])))
    with np.load(runner.shard_path(out, 0, 0)) as z:
        ok, reason, angle = z["ok"], z["reason"], z["curve_angle"]
    assert list(ok) == [False, True]
    assert angle[0] == pytest.approx(np.pi, abs=1e-3)
    assert "180.0000 degrees apart, within 0.001 rad (0.0573 degrees) of antiparallel" in reason[0]
    assert "--path=linear" in reason[0]


def test_other_configuration_writes_nothing_and_overwrite_replaces(tiny_model, tmp_path):
    """Issue 10, defect 3 (library part): refused before anything is written; --overwrite
    deletes the old sweep's files first."""
    from plateau_jax.sweep import SweepSpec, report
    out = str(tmp_path / "s")
    pairs = _pairs(tiny_model, 4)
    engine = one_device_engine(tiny_model)
    runner.run_sweep(tiny_model, pairs, SPEC, out, batch_size=BATCH, show_progress=False,
                     engine=engine)
    report.write_report(out, figures=False)
    snapshot = {n: open(os.path.join(out, n), "rb").read() for n in ("manifest.json", "pairs.jsonl")}
    called = []
    other = SweepSpec(layers=(0,), n_steps=SPEC.n_steps, tol=SPEC.tol, sharpness_width=0.04)
    with pytest.raises(runner.ConfigMismatchError, match="sharpness_width: 0.05 .on disk. vs 0.04"):
        runner.run_sweep(tiny_model, pairs, other, out, batch_size=BATCH, show_progress=False,
                         engine=engine, before_write=lambda: called.append(1))
    assert not called
    assert snapshot == {n: open(os.path.join(out, n), "rb").read() for n in snapshot}
    with pytest.raises(runner.ConfigMismatchError):
        runner.check_output(out, runner.early_config(other, BATCH, 0.05, 0.5), runner.EARLY_KEYS)
    # --overwrite: the old sweep (shards, report) is deleted, the new one written
    runner.run_sweep(tiny_model, pairs[:3], SPEC, out, batch_size=BATCH, show_progress=False,
                     engine=engine, overwrite=True, before_write=lambda: called.append(1))
    assert called and not os.path.lexists(os.path.join(out, "report"))
    assert json.load(open(os.path.join(out, "manifest.json")))["config"]["pairs"]["n"] == 3
