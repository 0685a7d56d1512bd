"""Loading and the forward pass: plateau_jax against transformers' PyTorch GPT-2, same weights.

1. Loading (``load``): :func:`plateau_jax.load_model` against transformers'
   ``GPT2LMHeadModel.from_pretrained`` on the same checkpoint (random weights of ``--load_size``
   written to a temp dir, or ``--model``), each in a fresh subprocess (so peak RSS is its own),
   interleaved; time from the start of the load call (imports excluded) and peak RSS against
   the checkpoint's size on disk.
2. Forward (``forward``): logits of a ``--batch`` x ``--seq`` batch, :func:`plateau_jax.forward`
   against HF torch (eager attention, no_grad) on ``--size`` random weights, interleaved.

    python benchmarks/bench_model.py                              # both, load on GPT-2 Large size
    python benchmarks/bench_model.py --workloads=forward --batch=1 --seq=8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common, harness  # noqa: E402

_LOAD_CHILD = r"""
import os, sys, time, json
sys.path.insert(0, {root!r})
from benchmarks import harness
harness.pin_threads({threads})
which, d = sys.argv[1], sys.argv[2]
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
if which == "ours":
    import jax, plateau_jax
    jax.devices()
    before = status("VmRSS:")
    c, t = time.process_time(), time.perf_counter()
    m = plateau_jax.load_model(d, require_tokenizer=False)
    jax.block_until_ready(m.params)
else:
    from benchmarks import torch_reference
    harness.configure_torch()
    import transformers
    before = status("VmRSS:")
    c, t = time.process_time(), time.perf_counter()
    torch_reference.load_hf(d)
wall, cpu = time.perf_counter() - t, time.process_time() - c
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak over the fork)
print("RESULT", json.dumps({{"wall": wall, "cpu": cpu, "rss": status("VmHWM:"), "before": before}}))
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--load_size", default="gpt2-large", help="preset of the loading checkpoint")
    ap.add_argument("--workloads", default="load,forward")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--baseline", default="true", choices=["true", "false"])
    harness.add_flags(ap)
    return ap


def _config(args) -> dict:
    return {**common.model_config(args), "load_size": args.load_size,
            "workloads": args.workloads, "batch": args.batch, "seq": args.seq}


def _load_in_child(which: str, directory: str, threads: int) -> harness.Measured:
    r = harness.child_result(_LOAD_CHILD.format(root=ROOT, threads=threads), which, directory,
                             env={"HF_HUB_OFFLINE": "1"})
    return harness.Measured(r["wall"], r["cpu"], (r["rss"], r["before"]))


def bench_load(args, report):
    import plateau_jax as pj

    with tempfile.TemporaryDirectory(prefix="plateau_bench_load_") as tmp:
        directory = args.model or tmp
        if not args.model:
            cfg = pj.ModelConfig.preset(args.load_size)
            pj.save_model(pj.init_model(cfg, seed=0), tmp)
        size = os.path.getsize(os.path.join(directory, "model.safetensors"))
        sides = {"ours": lambda: _load_in_child("ours", directory, args.threads)}
        if args.baseline == "true":
            sides = {"hf torch": lambda: _load_in_child("hf", directory, args.threads), **sides}
        keep_rss = {k: [] for k in sides}

        def tracked(name, fn):
            def run():
                m = fn()
                keep_rss[name].append(m.out)
                return m
            return run

        t = harness.compare({k: tracked(k, f) for k, f in sides.items()}, args.repeats)
    rss = {k: max(r for r, _ in v) for k, v in keep_rss.items()}
    grown = {k: max(r - b for r, b in v) for k, v in keep_rss.items()}
    report.add("load", f"load a {size / 2 ** 30:.2f} GiB checkpoint in a fresh process (imports "
               "excluded)", t, baseline="hf torch", ours="ours",
               checkpoint_bytes=size,
               peak_rss_gib={k: round(v / 2 ** 30, 3) for k, v in rss.items()},
               peak_rss_over_disk={k: round(v / size, 3) for k, v in rss.items()},
               load_rss_growth_over_disk={k: round(v / size, 3) for k, v in grown.items()})


def bench_forward(args, report):
    import numpy as np

    import plateau_jax as pj

    model, directory = common.load(args, need_dir=args.baseline == "true")
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    sides = {"ours": lambda: pj.forward(model, ids)[0]}
    if args.baseline == "true":
        from benchmarks.torch_reference import load_hf

        torch = harness.configure_torch(harness.torch_device())
        ref = load_hf(directory, device=harness.torch_device())
        tids = torch.tensor(ids, dtype=torch.long, device=harness.torch_device())

        def hf():
            with torch.no_grad():
                return ref(tids).logits

        sides = {"hf torch": hf, **sides}
    keep = {}
    t = harness.compare(sides, args.repeats, keep=keep)
    extra = {"tokens_per_s": {k: args.batch * args.seq / v.median for k, v in t.items()}}
    if "hf torch" in keep:
        extra["max_abs_logit_diff"] = float(np.abs(np.asarray(keep["ours"])
                                                   - keep["hf torch"].cpu().numpy()).max())
    report.add("forward", f"logits of {args.batch} x {args.seq} tokens", t, baseline="hf torch",
               ours="ours", **extra)
    common.cleanup(directory, args)


def main(argv=None):
    return harness.run_workloads("bench_model", build_parser(), _config,
                                 {"load": bench_load, "forward": bench_forward}, argv)


if __name__ == "__main__":
    main()
