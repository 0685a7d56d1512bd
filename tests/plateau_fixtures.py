"""Shared, cached fixtures for the plateau tests (one tiny checkpoint per test process)."""

import functools
import tempfile

import plateau_jax
from plateau_jax import testing

CONTEXT = "The house was"


@functools.lru_cache(maxsize=None)
def tiny_checkpoint_dir(scale: float = 3.0) -> str:
    """A random tiny GPT-2 (3 layers, d 32) with weights scaled up for sharper responses."""
    directory = tempfile.mkdtemp(prefix="plateau-tiny-")
    testing.make_checkpoint(directory, seed=0, scale=scale)
    return directory


@functools.lru_cache(maxsize=None)
def tiny_model() -> plateau_jax.GPT2:
    return plateau_jax.load_gpt2(tiny_checkpoint_dir())
