"""Sweep runs on disk: kill and resume, 1 vs 8 simulated devices, config mismatch, bad pairs."""

import json
import os
import signal
import subprocess
import sys
import time

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
            f"--tol={SPEC.tol}", f"--batch_size={BATCH}", f"--output_dir={out}"]


def _shards(out):
    d = os.path.join(out, "shards")
    return sorted(n for n in os.listdir(d) if n.endswith(".npz")) if os.path.isdir(d) else []


def test_kill_then_resume_equals_uninterrupted(tiny_dir, tiny_model, pairs_file, tmp_path):
    killed = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(_cmd(tiny_dir, pairs_file, killed), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env=dict(env, PLATEAU_JAX_SWEEP_TEST_DELAY="3"))
    t0 = time.time()
    while not _shards(killed):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _shards(killed)
    assert 1 <= len(partial) < 3, partial
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
                               input_errors=errors + enc_errors,
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
                         batch_size=BATCH)


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
