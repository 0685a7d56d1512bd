"""Plateau statistics at scale: many prompt pairs, sharded over every device, resumable.

Modules: :mod:`.inputs` (pairs files and generators), :mod:`.engine` (the sharded batch call),
:mod:`.stats` (per-pair statistics), :mod:`.refine` (boundary bisection), :mod:`.runner`
(shards, manifest, resume, errors), :mod:`.report` (aggregation, tables, figures).
"""

from plateau_jax.sharding import make_mesh
from plateau_jax.sweep.engine import SweepEngine, SweepSpec
from plateau_jax.sweep.stats import STAT_NAMES, pair_stats
