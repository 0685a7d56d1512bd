"""The benchmark machinery (no timing assertions): the harness interleaves, labels sampled sides
and writes its JSON record; the GPU suite records a hung step as a timeout and goes on, and
builds its table from the steps' records; a dry run of the suite end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_suite, harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_interleaves_cold_then_warm_and_scales_sampled_sides(tmp_path):
    calls = []
    sides = {"base": lambda: calls.append("A") or 1, "ours": lambda: calls.append("B") or 2}
    keep = {}
    t = harness.compare(sides, repeats=3, scales={"base": 10.0},
                        sampled={"base": "1 of 10 steps"}, keep=keep)
    assert calls == ["A", "B"] * 4
    assert keep == {"base": 1, "ours": 2}
    assert len(t["base"].warm) == 3 and t["base"].cold == t["base"].cold  # not NaN
    assert t["base"].scale == 10.0 and "SAMPLED: 1 of 10 steps" in t["base"].describe()
    # a side that measured itself (a subprocess) reports its own times
    t2 = harness.compare({"child": lambda: harness.Measured(5.0, 4.0)}, repeats=1)
    assert t2["child"].cold == 5.0 and t2["child"].warm == [5.0] and t2["child"].median_cpu == 4.0

    class Args:
        json_out = str(tmp_path / "rec.json")

    rep = harness.Report("unit", Args(), {"x": 1})
    rep.header()
    rec = rep.add("w", "two sides", t, baseline="base", ours="ours", extra_field=3)
    assert rec["ratio_warm"] == t["base"].median / t["ours"].median
    rep.finish()
    data = json.loads((tmp_path / "rec.json").read_text())
    assert data["config"] == {"x": 1} and len(data["load_before"]) == 3
    w = data["workloads"][0]
    assert w["extra_field"] == 3 and w["timings"]["base"]["sampled"] == "1 of 10 steps"
    assert set(w["timings"]["ours"]) >= {"cold_s", "warm_median_s", "warm_min_s", "warm_max_s",
                                         "warm_cpu_median_s", "busy_threads"}


@pytest.mark.slow
def test_pin_threads_sets_affinity_in_a_fresh_process():
    code = ("import json, os, sys; sys.path.insert(0, '.'); from benchmarks import harness; "
            "s = harness.pin_threads(1); import torch; harness.configure_torch(); "
            "print(json.dumps([sorted(os.sched_getaffinity(0)), s['affinity'], "
            "torch.get_num_threads(), os.environ['OMP_NUM_THREADS']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    affinity, pinned, torch_threads, omp = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(affinity) == 1 and affinity == pinned
    assert torch_threads == 1 and omp == "1"


def test_suite_step_timeout_is_recorded_and_the_group_killed(tmp_path):
    step = gpu_suite.Step("sleepy", "sleeps", [sys.executable, "-c",
                                               "import time; print('started', flush=True); "
                                               "time.sleep(60)"], 1)
    gpu_suite.run_step(step, 1.0, str(tmp_path))
    assert step.status == "timeout after 1 s"
    assert step.wall < 30
    assert "started" in step.result["log_tail"]
    ok = gpu_suite.Step("ok", "prints", [sys.executable, "-c", "print('RESULT {\"v\": 1}')"], 30)
    gpu_suite.run_step(ok, 30, str(tmp_path))
    assert ok.status == "ok" and ok.result == {"v": 1}
    bad = gpu_suite.Step("bad", "fails", [sys.executable, "-c", "raise SystemExit(3)"], 30)
    gpu_suite.run_step(bad, 30, str(tmp_path))
    assert bad.status == "FAILED (exit 3)"


def test_suite_table_from_step_records(tmp_path):
    args = gpu_suite.build_parser().parse_args([f"--out={tmp_path}"])
    steps = {s.name: s for s in gpu_suite.make_steps(args)}
    for s in steps.values():
        s.status, s.wall = "ok", 30.0
    steps["load"].result = {"imports_s": 2.0, "load_s": 6.0, "total_s": 8.0}
    steps["torch_baseline"].result = {"mlp_per_layer_step_s": 0.011, "mlp_all_s": 19.0,
                                      "stack_per_step_s": 0.557, "stack_all_s": 27.9,
                                      "n_layer": 36}
    ours = lambda cold, warm: {"cold_s": cold, "warm_median_s": warm}  # noqa: E731
    steps["bench_cached"].result = {
        "config": {"steps": 50, "pairs": 20, "layers": 36},
        "workloads": [{"workload": "a", "timings": {"ours (a)": ours(0.3, 0.2)}},
                      {"workload": "c", "timings": {"ours (c)": ours(3.0, 2.5)}}]}
    steps["bench"].status = "timeout after 240 s"
    steps["study_warm"].wall = 12.0
    steps["sweep"].result = {"pairs_per_s": 5.0}
    steps["pytest"].status = "FAILED (exit 1)"
    rows = gpu_suite.rows(steps, args)
    by = {r["step"]: r for r in rows}
    assert by["bench"]["status"] == "timeout after 240 s"
    a = by["bench_cached (a)"]
    assert a["baseline"] == pytest.approx(0.011 * 36 * 50) and "meets" in a["target"]
    assert a["ratio"] == pytest.approx(0.011 * 36 * 50 / 0.2)
    assert "MISSES" in by["bench_cached (c)"]["target"]
    assert "meets" in by["study_warm"]["target"]
    assert "(4.00 s after loading)" in by["study_warm"]["target"]
    assert by["sweep"]["ratio"] == pytest.approx(5.0 * 19.0)
    report = {"date": "now", "args": vars(args), "total_s": 100.0, "env": {"jax": "x"},
              "rows": rows}
    md = gpu_suite.markdown(report)
    assert "| step | what | cold | warm | baseline | ratio | target | status |" in md
    assert "timeout after 240 s" in md and "FAILED (exit 1)" in md


@pytest.mark.slow
def test_gpu_suite_dry_run_on_cpu(tmp_path):
    """The suite end to end on a 2-layer GPT-2-small-width model (pytest step skipped: it would
    run this test again)."""
    out = tmp_path / "suite"
    res = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", f"--out={out}", "--size=gpt2", "--n_layer=2",
         "--quick", "--limit_scale=4", "--budget=1500", "--skip=pytest,bench_tf32,sweep"],
        cwd=ROOT, capture_output=True, text=True, timeout=1600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    skipped = ("pytest", "bench_tf32", "sweep")
    assert all(v == "ok" for k, v in status.items() if k not in skipped), status
    md = (out / "gpu_suite.md").read_text()
    assert "| bench_cached (a) |" in md and "| study_warm |" in md and "| torch_baseline |" in md
