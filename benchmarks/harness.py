"""What every benchmark shares: thread pinning, interleaved timing, medians, load average, JSON.

The honest-measurement rules (docs/benchmarks.md):

* **Same thread count on both sides.** :func:`pin_threads` (call it first, before jax or torch
  start their thread pools) pins the process to N cores with ``os.sched_setaffinity`` and sets
  torch's intra-op threads to N (:func:`configure_torch`) and ``OMP/MKL/OPENBLAS_NUM_THREADS``.
  XLA's CPU client sizes its thread pool from the process's CPU affinity, so the affinity is what
  bounds XLA. Measured with jax 0.10.2 on a 2-core machine: with affinity {0} one XLA thread does
  all the work; ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
  is accepted but still leaves 3-4 busy XLA threads, so the harness does not rely on it.
  Every timing records the number of threads that did the work (:func:`thread_ticks`) and the
  CPU time, so a run whose threads were not what was asked for shows it.
* **Interleaved.** :func:`compare` runs baseline and ours alternately (A B A B ...), so a load
  change on a shared machine hits both.
* **Cold and warm separately.** The first call of each side is "cold" (XLA compilation
  included; no persistent compilation cache unless ``--compilation_cache`` is given); the
  ``--repeats`` later calls are "warm", reported as median, min and max.
* **Load average** before and after, thread settings, versions: printed and in the JSON record
  (``--json_out``).
* **Sampled baselines** are labelled: a baseline timed on k of N steps carries ``scale = N / k``
  and its times are the measured times x scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

_SETTINGS: Dict[str, Any] = {}


# ----------------------------------------------------------------------------- threads

def add_flags(parser: argparse.ArgumentParser, repeats: int = 3) -> argparse.ArgumentParser:
    """The flags every benchmark takes."""
    parser.add_argument("--threads", type=int, default=1,
                        help="pin the process to this many cores; torch and XLA use that many "
                             "threads (0: no pinning, leave the defaults)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="warm repeats of each side after the cold call (interleaved)")
    parser.add_argument("--json_out", default=None, help="also write the JSON record here")
    parser.add_argument("--compilation_cache", default="",
                        help="persistent XLA compilation cache directory; empty (the default for "
                             "benchmarks) so that 'cold' includes compilation")
    parser.add_argument("--matmul_precision", default="highest",
                        help="matmul precision of our side (highest = float32 everywhere; "
                             "tensorfloat32 etc. are faster on GPUs); torch keeps TF32 off")
    return parser


def pin_threads(n: int) -> Dict[str, Any]:
    """Pins this process (every existing thread) to ``n`` cores and sets the thread counts.

    Call before importing jax/torch if possible (threads created later inherit the affinity;
    existing ones are re-pinned here too). ``n == 0`` leaves everything as it is.
    """
    allowed = sorted(os.sched_getaffinity(0))
    settings = {"threads": n, "cpus_visible": len(allowed)}
    # GPUs: jax would otherwise take 75% of the memory at start and leave torch none
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if n > 0:
        if n > len(allowed):
            raise SystemExit(f"--threads={n} but only {len(allowed)} CPUs are available to this "
                             f"process ({allowed}).")
        cpus = set(allowed[:n])
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(n)
        settings["affinity"] = sorted(cpus)
    settings["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules:
        settings["note"] = "jax was imported before pinning"
    _SETTINGS.update(settings)
    if "torch" in sys.modules:
        configure_torch()
    return dict(_SETTINGS)


def configure_torch(device: str = "cpu"):
    """Imports torch with the pinned thread count and TF32 off; returns the module."""
    import torch

    n = _SETTINGS.get("threads", 0)
    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first inter-op work
            pass
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    _SETTINGS.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     torch_tf32=False, torch_device=device)
    return torch


def configure_jax(args) -> Dict[str, Any]:
    """Compilation cache per ``--compilation_cache`` (off by default); records the backend."""
    import jax

    from plateau_jax.compilation import enable_compilation_cache

    cache = enable_compilation_cache(args.compilation_cache or None)
    dev = jax.devices()[0]
    _SETTINGS.update(jax=jax.__version__, backend=dev.platform, device=str(dev),
                     device_kind=getattr(dev, "device_kind", ""), compilation_cache=cache,
                     matmul_precision=args.matmul_precision)
    return dict(_SETTINGS)


def torch_device() -> str:
    """The device the torch side runs on: CUDA when jax runs on a GPU, else the CPU."""
    return _SETTINGS.get("torch_device", "cpu")


def thread_ticks() -> Dict[int, int]:
    """CPU clock ticks (user + system) of every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return out


def busy_threads(before: Dict[int, int], after: Dict[int, int], share: float = 0.05) -> int:
    """Threads that did at least ``share`` of the CPU work between two :func:`thread_ticks`."""
    deltas = [after[t] - before.get(t, 0) for t in after]
    total = sum(deltas)
    return sum(d >= share * total for d in deltas) if total > 0 else 0


# ----------------------------------------------------------------------------- timing

def block(out):
    """Waits for ``out`` (jax arrays anywhere in a pytree; torch CUDA work) to be computed."""
    if "jax" in sys.modules:
        import jax

        jax.block_until_ready(out)
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    return out


@dataclasses.dataclass
class Timing:
    """One side of a comparison: the cold call and the warm repeats (seconds, x ``scale``)."""

    scale: float = 1.0
    sampled: str = ""  # e.g. "2 of 50 steps per layer, scaled linearly"
    cold: float = float("nan")
    cold_cpu: float = float("nan")
    warm: List[float] = dataclasses.field(default_factory=list)
    warm_cpu: List[float] = dataclasses.field(default_factory=list)
    busy_threads: int = 0
    _ticks: Dict[int, int] = dataclasses.field(default_factory=dict, repr=False)

    def record(self, wall: float, cpu: float, cold: bool):
        if cold:
            self.cold, self.cold_cpu = wall * self.scale, cpu * self.scale
        else:
            self.warm.append(wall * self.scale)
            self.warm_cpu.append(cpu * self.scale)

    @property
    def median(self) -> float:
        return statistics.median(self.warm) if self.warm else float("nan")

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.warm_cpu) if self.warm_cpu else float("nan")

    def to_json(self) -> Dict[str, Any]:
        w = self.warm
        return {"cold_s": self.cold, "cold_cpu_s": self.cold_cpu, "warm_s": w,
                "warm_median_s": self.median, "warm_min_s": min(w) if w else None,
                "warm_max_s": max(w) if w else None, "warm_cpu_median_s": self.median_cpu,
                "busy_threads": self.busy_threads,
                "cores_busy": ratio(self.median_cpu, self.median), "scale": self.scale,
                "sampled": self.sampled}

    def describe(self) -> str:
        s = f"cold {fmt_s(self.cold)}"
        if self.warm:
            s += (f", warm median {fmt_s(self.median)} (min {fmt_s(min(self.warm))}, max "
                  f"{fmt_s(max(self.warm))}, n={len(self.warm)}; cpu {fmt_s(self.median_cpu)})")
        if self.warm:
            s += (f"; {self.busy_threads} thread(s) ran it, "
                  f"{ratio(self.median_cpu, self.median):.1f} cores busy")
        if self.sampled:
            s += f"; SAMPLED: {self.sampled}"
        return s


def fmt_s(t: Optional[float]) -> str:
    if t is None or t != t:
        return "-"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.1f} ms"


@dataclasses.dataclass
class Measured:
    """Returned by a timed function that measured itself (e.g. in a subprocess): these times are
    recorded instead of the call's."""

    wall: float
    cpu: float
    out: Any = None


def _timed_call(fn: Callable, timing: Timing, cold: bool):
    t0 = thread_ticks()
    c = time.process_time()
    t = time.perf_counter()
    out = block(fn())
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if isinstance(out, Measured):
        wall, cpu = out.wall, out.cpu
    timing.record(wall, cpu, cold)
    t1 = thread_ticks()
    for tid, v in t1.items():
        timing._ticks[tid] = timing._ticks.get(tid, 0) + v - t0.get(tid, 0)
    timing.busy_threads = busy_threads({}, timing._ticks)
    return out


def compare(sides: Dict[str, Callable], repeats: int, scales: Optional[Dict[str, float]] = None,
            sampled: Optional[Dict[str, str]] = None, keep: Optional[Dict[str, Any]] = None
            ) -> Dict[str, Timing]:
    """Times every side: one cold call each, then ``repeats`` warm rounds, interleaved in the
    order given (A B, A B, ...). ``scales``/``sampled`` label sides timed on a sample (times are
    multiplied by the scale). ``keep``, if a dict, receives each side's last output."""
    scales, sampled = scales or {}, sampled or {}
    timings = {k: Timing(scale=scales.get(k, 1.0), sampled=sampled.get(k, "")) for k in sides}
    for rnd in range(repeats + 1):
        for name, fn in sides.items():
            out = _timed_call(fn, timings[name], cold=rnd == 0)
            if keep is not None:
                keep[name] = out
            del out
    return timings


def ratio(num: float, den: float) -> float:
    return num / den if den and den == den and num == num else float("nan")


def child_result(code: str, *argv: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs ``python -c code argv...`` and returns the JSON it prints after ``RESULT ``; raises
    with the child's stderr when it fails."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"child process failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- report

class Report:
    """Collects a benchmark's settings and workloads; prints lines; writes the JSON record."""

    def __init__(self, name: str, args, config: Dict[str, Any]):
        self.name, self.args = name, args
        self.record = {"benchmark": name, "argv": sys.argv[1:], "config": config,
                       "load_before": os.getloadavg(), "host": platform.node(),
                       "python": platform.python_version(), "workloads": []}

    def header(self):
        s = dict(_SETTINGS)
        self.record["settings"] = s
        print(f"# {self.name}: {json.dumps(self.record['config'])}")
        print(f"# threads: --threads={s.get('threads')} (affinity {s.get('affinity', 'all')}, "
              f"{s.get('cpus_visible')} CPUs visible), torch threads {s.get('torch_threads', '-')}"
              f" (TF32 off), XLA_FLAGS={s.get('xla_flags') or '(none)'}; jax {s.get('jax', '-')} "
              f"on {s.get('device', '-')}, matmul precision {s.get('matmul_precision', '-')}, "
              f"compilation cache {s.get('compilation_cache') or 'off'}")
        print(f"# load average before: {fmt_load(self.record['load_before'])}", flush=True)

    def add(self, workload: str, what: str, timings: Dict[str, Timing],
            baseline: str = "baseline", ours: str = "ours", **extra) -> Dict[str, Any]:
        """Prints and records one workload; the ratio is baseline / ours (warm medians, cold
        calls, and warm CPU times)."""
        rec = {"workload": workload, "what": what,
               "timings": {k: t.to_json() for k, t in timings.items()}, **extra}
        for k, t in timings.items():
            print(f"[{workload}] {k:>10}: {t.describe()}")
        if baseline in timings and ours in timings:
            b, o = timings[baseline], timings[ours]
            rec["ratio_warm"] = ratio(b.median, o.median)
            rec["ratio_cold"] = ratio(b.cold, o.cold)
            rec["ratio_cpu"] = ratio(b.median_cpu, o.median_cpu)
            print(f"[{workload}] RATIO {baseline}/{ours}: warm {rec['ratio_warm']:.1f}x, cold "
                  f"{rec['ratio_cold']:.1f}x, cpu time {rec['ratio_cpu']:.1f}x  ({what})")
        for k, v in extra.items():
            print(f"[{workload}] {k}: {v}")
        sys.stdout.flush()
        self.record["workloads"].append(rec)
        return rec

    def note(self, workload: str, text: str, **extra):
        print(f"[{workload}] {text}", flush=True)
        self.record["workloads"].append({"workload": workload, "what": text, **extra})

    def finish(self) -> Dict[str, Any]:
        self.record["load_after"] = os.getloadavg()
        print(f"# load average after: {fmt_load(self.record['load_after'])}")
        if getattr(self.args, "json_out", None):
            write_json(self.args.json_out, self.record)
            print(f"# JSON record: {self.args.json_out}")
        sys.stdout.flush()
        return self.record


def fmt_load(load) -> str:
    return " ".join(f"{x:.2f}" for x in load) + f" (1/5/15 min; {os.cpu_count()} CPUs)"


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def start(name: str, parser: argparse.ArgumentParser, config_fn: Callable[[Any], Dict[str, Any]],
          argv=None):
    """Parses flags, pins threads, configures jax (and torch when ``args.baseline`` is on),
    prints the header. Returns (args, report)."""
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    configure_jax(args)
    if str(getattr(args, "baseline", "true")).lower() not in ("false", "0", "no"):
        import jax

        configure_torch("cuda" if jax.devices()[0].platform == "gpu" else "cpu")
    report = Report(name, args, config_fn(args))
    report.header()
    return args, report


def run_workloads(name: str, parser: argparse.ArgumentParser,
                  config_fn: Callable[[Any], Dict[str, Any]],
                  workloads: Dict[str, Callable[[Any, Report], None]], argv=None):
    """:func:`start`, then each workload named in ``--workloads`` in the order given here."""
    args, report = start(name, parser, config_fn, argv)
    chosen = args.workloads.split(",")
    for key, fn in workloads.items():
        if key in chosen:
            fn(args, report)
    return report.finish()
