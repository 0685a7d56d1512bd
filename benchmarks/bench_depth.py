r"""Compile time against depth: the whole study-style run (``python -m experiments.plateaus``, all
interpolation layers, freezing, every figure) on tiny-width random checkpoints of 12 and 36
layers, each in a fresh process: cold (no compilation cache) and warm (a second process reading
the persistent cache), with the number of XLA programs compiled.

    python benchmarks/bench_depth.py [--layers=12,36] [--d_model=64] [--steps=50] [--repeats=2]

Target: cold at 36 layers <= 1.5x cold at 12 layers (the first release unrolled every block and
grew about quadratically). Runs alternate between depths (12, 36, 12, 36, ...); medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402

# Run in the child: the study's main, with the number of programs compiled counted.
_CHILD = """
import sys, json, time
t0 = time.perf_counter()
from plateau_jax.compilation import CompileCounter
from absl import flags
from experiments import common, plateaus
with CompileCounter() as c:
    try:
        common.run(plateaus.main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
print(json.dumps({"wall": time.perf_counter() - t0, "programs": c.count,
                  "cache_hits": c.cache_hits, "backend_s": c.seconds}))
"""


def make_checkpoints(layers, d_model, directory):
    from plateau_jax import ModelConfig, testing

    tok = os.path.join(directory, "tokenizer")
    tokenizer = testing.make_tokenizer(tok)
    out = {}
    for n in layers:
        d = os.path.join(directory, f"L{n}")
        cfg = ModelConfig.gpt2(vocab_size=len(tokenizer), n_positions=64, d_model=d_model,
                               n_layer=n, n_head=4)
        testing.make_checkpoint(d, cfg, tokenizer=tokenizer, scale=3.0)
        out[n] = d
    return out


def run_study(model_dir, out_dir, cache, steps):
    argv = [sys.executable, "-c", _CHILD, f"--model={model_dir}", f"--output_dir={out_dir}",
            f"--steps={steps}", f"--compilation_cache={cache}", "--overwrite"]
    env = dict(os.environ, PLATEAU_JAX_NO_PROGRESS="1", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="12,36")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json_out", default=None)
    args = p.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    load0 = os.getloadavg()
    rows = {n: {"cold": [], "warm": [], "programs": None} for n in layers}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_checkpoints(layers, args.d_model, tmp)
        for rep in range(args.repeats):
            for n in layers:  # interleaved
                cache = os.path.join(tmp, f"cache-{n}-{rep}")
                cold = run_study(dirs[n], os.path.join(tmp, "out"), cache, args.steps)
                warm = run_study(dirs[n], os.path.join(tmp, "out"), cache, args.steps)
                rows[n]["cold"].append(cold["wall"])
                rows[n]["warm"].append(warm["wall"])
                rows[n]["programs"] = cold["programs"]
                rows[n]["warm_programs"] = warm["programs"]
                rows[n]["warm_hits"] = warm["cache_hits"]
    print(f"# study-style run, d_model={args.d_model}, {args.steps} steps, all interpolation layers; "
          f"load {harness.fmt_load(load0)} -> {harness.fmt_load(os.getloadavg())}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for n in layers:
        r = rows[n]
        print(f"{n:>3} layers: cold {statistics.median(r['cold']):6.1f} s "
              f"({r['programs']} programs compiled), warm {statistics.median(r['warm']):6.1f} s "
              f"({r['warm_programs']} compiled, {r['warm_hits']} read from the cache)")
    lo, hi = min(layers), max(layers)
    ratio = statistics.median(rows[hi]["cold"]) / statistics.median(rows[lo]["cold"])
    print(f"cold {hi} layers / {lo} layers = {ratio:.2f}x (target <= 1.5x)")
    if args.json_out:
        harness.write_json(args.json_out, {"rows": rows, "ratio": ratio, "load_before": load0,
                                           "load_after": os.getloadavg(), "args": vars(args)})


if __name__ == "__main__":
    main()
