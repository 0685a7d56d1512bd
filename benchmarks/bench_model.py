"""Loading and forward-pass benchmark (issue: functional GPT-2).

1. Load time and peak RSS of ``load_gpt2`` on a random GPT-2-Large-sized checkpoint written to a
   temp dir (the loader runs in a fresh subprocess so its peak RSS is its own), against the size
   of the checkpoint on disk.
2. Forward throughput (tokens/s) of ``plateau_jax.forward`` against transformers' PyTorch
   GPT2LMHeadModel on the same random weights, same process, same CPU; prints the ratio.

Usage: python -m benchmarks.bench_model [--size=gpt2-large] [--fwd_size=gpt2] [--batch=8 --seq=128]
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("size", "gpt2-large", "Preset for the loading benchmark.")
flags.DEFINE_string("fwd_size", "gpt2", "Preset for the forward benchmark.")
flags.DEFINE_integer("batch", 8, "Forward batch size.")
flags.DEFINE_integer("seq", 128, "Forward sequence length.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (best is reported).")
flags.DEFINE_bool("skip_load", False, "Skip the loading benchmark.")
FLAGS = flags.FLAGS

_LOAD_CHILD = """
import resource, sys, time
t = time.perf_counter()
import plateau_jax, jax
m = plateau_jax.load_gpt2(sys.argv[1], require_tokenizer=False)
jax.block_until_ready(m.params)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_random_checkpoint(preset: str, directory: str) -> int:
    """Streams random float32 weights of ``preset``'s shapes into model.safetensors; returns bytes."""
    import json

    from safetensors.numpy import save_file

    import plateau_jax
    cfg = plateau_jax.GPT2Config.preset(preset)
    shapes = plateau_jax.model.loading._flatten(plateau_jax.model.params.abstract_params(cfg))
    rng = np.random.default_rng(0)
    tensors = {"transformer." + k: (rng.standard_normal(v.shape, np.float32) * 0.02)
               for k, v in shapes.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    del tensors
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return os.path.getsize(os.path.join(directory, "model.safetensors"))


def bench_load(preset: str):
    with tempfile.TemporaryDirectory() as d:
        size = write_random_checkpoint(preset, d)
        out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, d], check=True,
                             capture_output=True, text=True).stdout.split()
        seconds, rss = float(out[0]), int(out[1])
    print(f"[load] {preset}: checkpoint {size / 2**30:.2f} GiB, load {seconds:.1f} s "
          f"(incl. imports), peak RSS {rss / 2**30:.2f} GiB = {rss / size:.2f}x on-disk size "
          f"(target < 1.5x)")


def bench_forward(preset: str, batch: int, seq: int, repeats: int):
    import jax
    import torch
    from transformers import GPT2LMHeadModel

    import plateau_jax
    cfg = plateau_jax.GPT2Config.preset(preset)
    model = plateau_jax.init_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as d:
        plateau_jax.save_gpt2(model, d)
        ref = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    tids = torch.tensor(ids, dtype=torch.long)

    def ours():
        return jax.block_until_ready(plateau_jax.forward(model, ids)[0])

    def theirs():
        with torch.no_grad():
            return ref(tids).logits

    diff = np.abs(np.asarray(ours()) - theirs().numpy()).max()
    times = {}
    for name, fn in (("plateau_jax", ours), ("hf_torch", theirs)):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        times[name] = best
        print(f"[forward] {name:12s} {preset} batch {batch} x {seq}: {best * 1e3:8.1f} ms "
              f"({batch * seq / best:,.0f} tokens/s)")
    print(f"[forward] speed-up plateau_jax / HF torch: {times['hf_torch'] / times['plateau_jax']:.2f}x "
          f"(max |logit diff| {diff:.2e}; torch threads {torch.get_num_threads()})")


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(_):
    if not FLAGS.skip_load:
        bench_load(FLAGS.size)
    bench_forward(FLAGS.fwd_size, FLAGS.batch, FLAGS.seq, FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
