"""Shared settings for the sweep tests (one spec, so each compiled program is reused)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np

from plateau_jax.sweep import SweepSpec

SPEC = SweepSpec(layers=(0,), n_steps=8, path="slerp", component="resid_post", tol=1e-2,
                 sharpness_width=0.05, refine="all")
BATCH = 4  # pairs per batch in every in-process test: one compiled program for all of them
CONTEXTS = ["The house was", "The cat sat on the", "It is", "The sky is blue . The man was"]
ENDINGS = [(" big", " in"), (" big", " large"), (" red", " small"), (" happy", " tall")]
# A compilation cache shared with the test subprocesses, so that a subprocess running the same
# program as this process (the kill/resume test) loads it instead of compiling it again.
CACHE_DIR = tempfile.mkdtemp(prefix="plateau_jax_sweep_xla_")
atexit.register(shutil.rmtree, CACHE_DIR, True)
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch(model, n=4):
    """Right-padded ids, lengths and ending tokens for n pairs from CONTEXTS x ENDINGS."""
    from plateau_jax.plateaus.prompts import encode_pair
    pairs = [encode_pair(model.tokenizer, CONTEXTS[i % 4], *ENDINGS[i % 4], model.config.n_positions)
             for i in range(n)]
    T = -(-max(len(p.context_ids) for p in pairs) // 8) * 8  # as the runner pads
    ids = np.zeros((n, T), np.int32)
    for i, p in enumerate(pairs):
        ids[i, :len(p.context_ids)] = p.context_ids
    return (pairs, ids, np.array([len(p.context_ids) for p in pairs]),
            np.array([p.token_a for p in pairs]), np.array([p.token_b for p in pairs]))


def one_device_engine(model):
    from plateau_jax.sweep import SweepEngine, make_mesh
    return SweepEngine(model, SPEC, mesh=make_mesh(jax.devices()[:1]))


def run_py(code, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
