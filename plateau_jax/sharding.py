"""Data parallelism over every device of every process: a 1-D mesh whose one axis shards the
batch (prompt pairs in the sweep, base points in the direction experiments, prompts when
collecting reference activations). Multi-host runs call ``jax.distributed.initialize`` first; the
mesh then spans every host's devices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXIS = "batch"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process), axis :data:`AXIS`."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))
