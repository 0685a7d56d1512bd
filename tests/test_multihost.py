"""Multi-host sweeps, really run: two local processes joined by ``jax.distributed`` (loopback
coordinator, gloo CPU collectives), each with two simulated devices, write the same files as one
process holding all four devices. The commands are the ones docs/sweeps.md gives."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sweep_helpers import BATCH, CONTEXTS, ENDINGS, ROOT, SPEC

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _sweep(model_dir, pairs_file, out, *extra):
    return [sys.executable, "-m", "experiments.sweep", f"--model={model_dir}",
            f"--pairs_file={pairs_file}", "--layers=0,1", f"--n_steps={SPEC.n_steps}",
            f"--tol={SPEC.tol}", f"--sharpness_width={SPEC.sharpness_width}",
            f"--batch_size={BATCH}", f"--output_dir={out}", "--compilation_cache=", *extra]


def test_two_processes_write_what_one_process_writes(tiny_dir, tmp_path):
    pairs_file = tmp_path / "pairs.jsonl"
    words = sorted({w for pair in ENDINGS for w in pair})  # one-token endings
    pairs_file.write_text("".join(
        json.dumps({"context": CONTEXTS[i % 4], "ending_a": words[i % len(words)],
                    "ending_b": words[(i + 3) % len(words)]}) + "\n" for i in range(10)))
    single, multi = tmp_path / "single", tmp_path / "multi"
    ref = subprocess.run(_sweep(tiny_dir, pairs_file, single), cwd=ROOT, env=_env(4),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        _sweep(tiny_dir, pairs_file, multi, "--distributed", f"--coordinator_address={address}",
               "--num_processes=2", f"--process_id={i}"),
        cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]

    shards = sorted(os.listdir(single / "shards"))
    assert shards == sorted(os.listdir(multi / "shards")) and len(shards) == 6  # 2 layers x 3
    for name in shards:
        with np.load(single / "shards" / name) as a, np.load(multi / "shards" / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                if a[k].dtype.kind == "f":
                    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7,
                                               err_msg=f"{name}:{k}")
                else:
                    np.testing.assert_array_equal(b[k], a[k], err_msg=f"{name}:{k}")
    for f in ("pairs.jsonl", "errors.jsonl", "report/summary.csv"):
        assert (single / f).read_text() == (multi / f).read_text(), f
