"""Shared, cached fixtures for the plateau tests (one tiny checkpoint per test process).

The weights are drawn with numpy on the param tree's abstract shapes: same layout and file
format as :func:`plateau_jax.testing.make_checkpoint`, without the slow eager Flax init.
"""

import functools
import tempfile

import jax
import numpy as np

import plateau_jax
from plateau_jax import testing

CONTEXT = "The house was"


def _random_params(config, seed: int, scale: float):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [getattr(p, "key", "") for p in path]
        if any(k.startswith("ln") for k in keys):  # LayerNorms: near 1 (weight) / 0 (bias)
            base = 1.0 if keys[-1] == "w" else 0.0
            return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (0.02 * scale * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, plateau_jax.model.params.abstract_params(config))


@functools.lru_cache(maxsize=None)
def tiny_checkpoint_dir(scale: float = 3.0) -> str:
    """A random tiny GPT-2 (3 layers, d 32, d_mlp 48, vocab 400), weights ~ N(0, 0.02 scale)."""
    directory = tempfile.mkdtemp(prefix="plateau-tiny-")
    config = testing.tiny_config()
    tokenizer = testing.make_tokenizer(directory, vocab_size=config.vocab_size)
    model = plateau_jax.GPT2(params=_random_params(config, 0, scale), config=config,
                             tokenizer=tokenizer)
    plateau_jax.save_gpt2(model, directory)
    return directory


@functools.lru_cache(maxsize=None)
def tiny_model() -> plateau_jax.GPT2:
    return plateau_jax.load_gpt2(tiny_checkpoint_dir())
