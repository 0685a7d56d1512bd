"""The GPU suite: one command, every step a subprocess with its own time limit.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out=/tmp/gpu_suite          # on one H100/H200
    python benchmarks/gpu_suite.py --out=/tmp/suite --size=gpt2 --n_layer=2 --quick   # CPU dry run

Makes a random GPT-2 Large checkpoint with GPT-2's real tokenizer, then runs (docs/benchmarks.md,
"GPU suite"): the study's loop in plain PyTorch on the same device (TF32 off; MLP Jacobians per
layer-step and the full-stack Jacobian per step, sampled and scaled); our bench (a), (b), (c)
with a fresh compilation cache and again in a new process with that cache; the study flagfile
cold (fresh cache) and warm (same cache, new process); the Jacobian flagfile; the sweep's
pairs/s with Jacobian norms; ``pytest`` on the device. A step that fails or runs past its limit
is recorded ("timeout after N s") and the suite goes on; the whole suite keeps to ``--budget``
seconds. Writes ``OUT/gpu_suite.json``, ``OUT/gpu_suite.md`` and each step's log in ``OUT/logs``.

Runs from the repository root without installing anything (the children get ``PYTHONPATH`` =
the repository root); needs jax, torch, transformers, flax, optax, safetensors, absl,
matplotlib, tokenizers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import fmt_s, write_json  # noqa: E402

# Targets on one H100/H200 with random GPT-2 Large (seconds, after loading): the speed the study's
# experiments should reach on an accelerator (docs/benchmarks.md, GPU suite).
TARGETS = {"a_cold": 0.34, "c_warm": 2.0, "study_cold": 20.0, "study_warm": 5.0,
           "jacobians_cold": 20.0}

_MAKE_MODEL = r"""
import json, sys, time
t = time.perf_counter()
import plateau_jax as pj
from plateau_jax import testing
size, n_layer, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = pj.ModelConfig.preset(size, **({"n_layer": n_layer} if n_layer else {}))
testing.make_checkpoint(d, cfg, tokenizer=pj.gpt2_tokenizer())
print("RESULT", json.dumps({"seconds": time.perf_counter() - t}))
"""

_LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, plateau_jax as pj
jax.devices()
t1 = time.perf_counter()
m = pj.load_model(sys.argv[1], center_writing_weights=True)
jax.block_until_ready(m.params)
t2 = time.perf_counter()
print("RESULT", json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0}))
"""

_ENV = r"""
import json, platform
out = {"python": platform.python_version()}
try:
    import jax
    out.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
               device_kind=getattr(jax.devices()[0], "device_kind", ""))
except Exception as e:
    out["jax_error"] = repr(e)
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
               torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
except Exception as e:
    out["torch_error"] = repr(e)
for mod in ("transformers", "flax", "optax", "safetensors", "absl", "matplotlib", "tokenizers"):
    try:
        out[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception as e:
        out[mod] = "MISSING: " + repr(e)
print("RESULT", json.dumps(out))
"""


@dataclasses.dataclass
class Step:
    name: str
    what: str
    argv: List[str]
    limit: int
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    json_out: Optional[str] = None  # the step's own JSON record
    fresh: List[str] = dataclasses.field(default_factory=list)  # paths removed before the step
    # result fields filled by run_step
    status: str = "not run"
    wall: float = float("nan")
    result: dict = dataclasses.field(default_factory=dict)
    log: str = ""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--size", default="gpt2-large", help="preset of the random model")
    ap.add_argument("--n_layer", type=int, default=0, help="override the preset's depth (dry runs)")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for the whole suite; each step gets min(its limit, what is left)")
    ap.add_argument("--limit_scale", type=float, default=1.0,
                    help="multiply every step's limit (e.g. 3 for a CPU dry run)")
    ap.add_argument("--quick", action="store_true",
                    help="small settings for a dry run (bench 6 steps x 4 pairs, 16 sweep pairs)")
    ap.add_argument("--reuse_model", action="store_true",
                    help="keep OUT/model if it is there (skips making the checkpoint)")
    ap.add_argument("--skip", default="", help="comma list of step names to skip")
    ap.add_argument("--sweep_pairs", type=int, default=256)
    ap.add_argument("--pytest_args", default="-x",
                    help="arguments of 'python -m pytest' (pyproject adds -q), e.g. "
                         "'-x -m \"not slow\"'")
    return ap


def make_steps(args) -> List[Step]:
    out, py = args.out, sys.executable
    model = os.path.join(out, "model")
    runs, logs = os.path.join(out, "runs"), os.path.join(out, "logs")
    cache = lambda name: os.path.join(out, "xla_cache", name)  # noqa: E731
    q = args.quick
    steps_ = "6" if q else "50"
    bench = [py, "benchmarks/bench_jacobians.py", f"--model={model}", "--threads=0",
             "--baseline=false", f"--steps={steps_}", f"--pairs={4 if q else 20}"]
    exp = lambda mod, name, ff, c: [py, "-m", mod, f"--flagfile=experiments/flags/{ff}",  # noqa
                                    f"--model={model}", f"--output_dir={os.path.join(runs, name)}",
                                    f"--compilation_cache={cache(c)}"]
    js = lambda name: os.path.join(logs, f"{name}.json")  # noqa: E731
    return [
        Step("env", "versions and devices", [py, "-c", _ENV], 90),
        Step("make_model", f"random {args.size} checkpoint with GPT-2's tokenizer",
             [py, "-c", _MAKE_MODEL, args.size, str(args.n_layer), model], 240),
        Step("load", "fresh process: imports, then load_model(center_writing_weights=True)",
             [py, "-c", _LOAD, model], 90),
        Step("torch_baseline", "the study's loop in PyTorch on this device (TF32 off)",
             [py, "-m", "benchmarks.torch_reference", f"--model={model}", "--device=auto",
              f"--steps={steps_}", "--layer_steps=3", "--stack_steps=2",
              f"--json_out={js('torch_baseline')}"], 180, json_out=js("torch_baseline")),
        Step("bench", "bench_jacobians (a), (b), (c): fresh compilation cache",
             bench + ["--repeats=2", f"--compilation_cache={cache('bench')}",
                      f"--json_out={js('bench')}"], 240, json_out=js("bench"),
             fresh=[cache("bench")]),
        Step("bench_cached", "bench_jacobians again in a new process, compilation cache warm",
             bench + ["--repeats=1", f"--compilation_cache={cache('bench')}",
                      f"--json_out={js('bench_cached')}"], 150, json_out=js("bench_cached")),
        Step("bench_tf32", "bench_jacobians (a), (c) with --matmul_precision=tensorfloat32",
             bench + ["--repeats=1", "--workloads=a,c", "--matmul_precision=tensorfloat32",
                      f"--compilation_cache={cache('bench_tf32')}",
                      f"--json_out={js('bench_tf32')}"], 150, json_out=js("bench_tf32"),
             fresh=[cache("bench_tf32")]),
        Step("study_cold", "experiments.plateaus, study.flags, fresh compilation cache",
             exp("experiments.plateaus", "study_cold", "study.flags", "study"), 150,
             fresh=[cache("study"), os.path.join(runs, "study_cold")]),
        Step("study_warm", "experiments.plateaus, study.flags, same cache, new process",
             exp("experiments.plateaus", "study_warm", "study.flags", "study"), 90,
             fresh=[os.path.join(runs, "study_warm")]),
        Step("jacobians_cold", "experiments.jacobians, jacobians_study.flags, fresh cache",
             exp("experiments.jacobians", "jacobians_cold", "jacobians_study.flags", "jac"), 150,
             fresh=[cache("jac"), os.path.join(runs, "jacobians_cold")]),
        Step("sweep", f"experiments.sweep, {args.sweep_pairs if not q else 16} random pairs, "
             "layer 0, Jacobian norms",
             [py, "-m", "experiments.sweep", f"--model={model}", "--generate=random",
              f"--n_pairs={16 if q else args.sweep_pairs}", "--layers=0",
              f"--output_dir={os.path.join(runs, 'sweep')}",
              f"--compilation_cache={cache('sweep')}"], 150,
             fresh=[cache("sweep"), os.path.join(runs, "sweep")]),
        Step("precision_errors", "benchmarks/precision_errors.py: errors of every "
             "matmul_precision against 'highest' and of 'highest' against PyTorch (docs/numerics.md)",
             [py, "benchmarks/precision_errors.py", f"--size={args.size}",
              f"--n_layer={args.n_layer or 12}", f"--json_out={js('precision_errors')}"], 150,
             json_out=js("precision_errors")),
        Step("pytest", f"python -m pytest {args.pytest_args} on this device",
             [py, "-m", "pytest"] + args.pytest_args.replace('"', "").split(), 300,
             env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
    ]


def child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_step(step: Step, limit: float, log_dir: str) -> Step:
    """Runs one step in its own process group; kills the group at ``limit`` seconds."""
    for p in step.fresh:
        shutil.rmtree(p, ignore_errors=True)
    step.log = os.path.join(log_dir, f"{step.name}.log")
    t = time.perf_counter()
    with open(step.log, "w") as log:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=child_env(step.env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            step.status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.status = f"timeout after {limit:.0f} s"
    step.wall = time.perf_counter() - t
    with open(step.log, errors="replace") as f:
        text = f.read()
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    if lines:
        step.result = json.loads(lines[-1][len("RESULT "):])
    if step.json_out and os.path.exists(step.json_out):
        with open(step.json_out) as f:
            step.result = json.load(f)
    if step.status != "ok":
        step.result["log_tail"] = text[-3000:]
    print(f"[{step.name}] {step.status} in {step.wall:.1f} s  ({step.what}); log {step.log}",
          flush=True)
    return step


# ----------------------------------------------------------------------------- the table

def _workload(step: Step, name: str) -> dict:
    for w in step.result.get("workloads", []):
        if w.get("workload") == name:
            return w
    return {}


def _side(w: dict, side: str) -> dict:
    return w.get("timings", {}).get(side, {})


def _target(value, limit) -> str:
    if value is None or value != value:
        return "-"
    return f"<= {fmt_s(limit)}: {'meets' if value <= limit else 'MISSES'}"


def rows(steps: Dict[str, Step], args) -> List[dict]:
    """The table: step, what, cold, warm, baseline, ratio, target, status."""
    out: List[dict] = []
    blank = {"cold": None, "warm": None, "baseline": None, "ratio": None, "target": ""}
    add = lambda **r: out.append({**blank, **r})  # noqa: E731
    base = steps["torch_baseline"].result if steps["torch_baseline"].status == "ok" else {}
    load = steps["load"].result.get("total_s") if steps["load"].status == "ok" else None
    for s in ("env", "make_model", "load"):
        st = steps[s]
        what = st.what
        if s == "load" and "load_s" in st.result:
            what += (f" (imports {fmt_s(st.result['imports_s'])}, load "
                     f"{fmt_s(st.result['load_s'])})")
        add(step=s, what=what, cold=st.result.get("total_s", st.wall), status=st.status)
    if base or steps["torch_baseline"].status != "not run":
        add(step="torch_baseline", what="study: MLP Jacobians per pair "
            f"({fmt_s(base.get('mlp_per_layer_step_s'))} per layer-step; "
            f"{base.get('mlp_sampled', '')})", baseline=base.get("mlp_all_s"),
            status=steps["torch_baseline"].status)
        add(step="torch_baseline", what="study: full-stack Jacobian per pair "
            f"({fmt_s(base.get('stack_per_step_s'))} per step; {base.get('stack_sampled', '')})",
            baseline=base.get("stack_all_s"), status=steps["torch_baseline"].status)
    for name in ("bench", "bench_cached", "bench_tf32"):
        st = steps[name]
        if st.status != "ok":
            add(step=name, what=st.what, status=st.status)
            continue
        n_steps = st.result.get("config", {}).get("steps") or 50
        for wl, side, bkey in (("a", "ours (a)", "mlp"), ("b1", "ours (b)", "mlp"),
                               ("b_many", "ours (b) many", "mlp"), ("c", "ours (c)", "stack")):
            w = _workload(st, wl)
            if not w:
                continue
            layers = st.result["config"].get("layers") or 0
            t = _side(w, side)
            b = None
            if base:
                b = (base["mlp_per_layer_step_s"] * layers * n_steps if bkey == "mlp"
                     else base["stack_per_step_s"] * n_steps)
            warm = t.get("warm_median_s")
            tgt = ""
            if wl == "a" and name == "bench_cached":
                tgt = _target(t.get("cold_s"), TARGETS["a_cold"]) + " (cold)"
            if wl == "c":
                tgt = _target(warm, TARGETS["c_warm"]) + " (warm)"
            what = BENCH_WHAT[wl].format(L=layers, N=n_steps, P=st.result["config"].get("pairs"))
            if name == "bench_tf32":
                what += ", TF32"
            add(step=f"{name} ({wl})", what=what, cold=t.get("cold_s"),
                warm=warm, baseline=b, ratio=(b / warm if b and warm else None), target=tgt,
                status=st.status)
    for name, key in (("study_cold", "study_cold"), ("study_warm", "study_warm"),
                      ("jacobians_cold", "jacobians_cold")):
        st = steps[name]
        after = st.wall - load if (load and st.status == "ok") else None
        add(step=name, what=st.what + " (cold/warm: whole process; target on the time after "
            "loading = process - load step)", cold=st.wall if "cold" in name else None,
            warm=st.wall if "warm" in name else None,
            target=_target(after, TARGETS[key]) + (f" ({fmt_s(after)} after loading)"
                                                    if after is not None else ""),
            status=st.status)
    st = steps["sweep"]
    pps = st.result.get("pairs_per_s")
    b = 1.0 / base["mlp_all_s"] if base else None
    add(step="sweep", what=st.what + " (pairs/s incl. compilation; baseline: the study's MLP "
        "Jacobians alone per pair)", warm=pps, baseline=b, ratio=(pps / b if pps and b else None),
        status=st.status, units="pairs/s")
    st = steps["precision_errors"]
    add(step="precision_errors", what=st.what + " (table below)", cold=st.wall, status=st.status)
    st = steps["pytest"]
    summary = st.result.get("summary")
    add(step="pytest", what=st.what + (f": {summary}" if summary else ""), cold=st.wall,
        status=st.status)
    return out


BENCH_WHAT = {
    "a": "(a) full MLP Jacobians, {L} layers x {N} steps (closed form; baseline: jacrev loop)",
    "b1": "(b) MLP Jacobian norms, one pair, {L} x {N} (Gram, Gram matrices included)",
    "b_many": "(b) MLP Jacobian norms per pair over {P} pairs (Gram matrices once)",
    "c": "(c) cumulative norms at all {L} depths x {N} steps (baseline: the study's one depth)",
}


def _fmt(v, units=""):
    if v is None or v != v:
        return "-"
    if units == "pairs/s":
        return f"{v:.2f} pairs/s"
    return fmt_s(v)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        "# GPU suite", "",
        f"{report['date']}; {env.get('device_kind') or env.get('devices')}; jax "
        f"{env.get('jax')}, torch {env.get('torch')} ({env.get('torch_device')}), transformers "
        f"{env.get('transformers')}; model: random {report['args']['size']}"
        f"{' n_layer=%d' % report['args']['n_layer'] if report['args']['n_layer'] else ''} "
        f"with GPT-2's tokenizer; suite {report['total_s']:.0f} s of a "
        f"{report['args']['budget']:.0f} s budget.", "",
        "Ours: float32 (`--matmul_precision=highest`) unless the step says tensorfloat32; the "
        "PyTorch baseline: TF32 off, per-step loops sampled and scaled linearly. cold = first "
        "call in a process (compilation or cache load included); warm = median of later calls.",
        "", "| step | what | cold | warm | baseline | ratio | target | status |",
        "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        u = r.get("units", "")
        ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
        lines.append(f"| {r['step']} | {r['what']} | {_fmt(r['cold'])} | {_fmt(r['warm'], u)} | "
                     f"{_fmt(r['baseline'], u)} | {ratio} | {r['target'] or '-'} | "
                     f"{r['status']} |")
    lines += precision_table(report.get("precision_errors") or {})
    lines += ["", "Logs: `logs/<step>.log`; JSON records: `logs/<step>.json`, `gpu_suite.json`."]
    return "\n".join(lines) + "\n"


def precision_table(table: dict) -> List[str]:
    """precision_errors.py's record as Markdown: errors against matmul_precision='highest'."""
    if not table:
        return []
    out = ["", "Errors of each `matmul_precision` against `highest` (random model, "
           "`benchmarks/precision_errors.py`):", "",
           "| precision | logits max rel | r(alpha) max abs | MLP Jacobian norms max rel |",
           "|---|---|---|---|"]
    for name, row in table.items():
        cell = lambda k, e: f"{row[k][e]:.2e}" if k in row else "-"  # noqa: E731
        out.append(f"| {name} | {cell('logits', 'max_rel')} | {cell('r', 'max_abs')} | "
                   f"{cell('mlp_fro', 'max_rel')} |")
    return out


def _pytest_summary(step: Step) -> None:
    if not step.log or not os.path.exists(step.log):
        return
    with open(step.log, errors="replace") as f:
        tail = [l for l in f.read().splitlines() if l.strip()]
    for l in reversed(tail[-5:]):
        if " passed" in l or " failed" in l or " error" in l:
            step.result["summary"] = l.strip("= ")
            return


def _sweep_result(step: Step) -> None:
    """experiments.sweep prints its run summary as one JSON line (pairs_per_s)."""
    if not step.log or not os.path.exists(step.log):
        return
    with open(step.log, errors="replace") as f:
        for l in f:
            if l.startswith("{") and "pairs_per_s" in l:
                try:
                    step.result.update(json.loads(l))
                except json.JSONDecodeError:
                    pass


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = os.path.abspath(args.out)
    log_dir = os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    t0 = time.perf_counter()
    steps = make_steps(args)
    skip = set(filter(None, args.skip.split(",")))
    if args.reuse_model and os.path.exists(os.path.join(args.out, "model", "config.json")):
        skip.add("make_model")
    for st in steps:
        left = args.budget - (time.perf_counter() - t0)
        if st.name in skip:
            st.status = "skipped"
            continue
        if left < 5:
            st.status = "skipped (suite budget spent)"
            continue
        run_step(st, min(st.limit * args.limit_scale, left), log_dir)
    by_name = {s.name: s for s in steps}
    _pytest_summary(by_name["pytest"])
    _sweep_result(by_name["sweep"])
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
              "total_s": time.perf_counter() - t0, "env": by_name["env"].result,
              "steps": [{k: v for k, v in dataclasses.asdict(s).items()} for s in steps]}
    report["rows"] = rows(by_name, args)
    if by_name["precision_errors"].status == "ok":
        report["precision_errors"] = by_name["precision_errors"].result
    write_json(os.path.join(args.out, "gpu_suite.json"), report)
    md = markdown(report)
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
