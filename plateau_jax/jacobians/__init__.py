"""Jacobians along interpolation paths: batched sweeps, MLP closed forms, spectral estimates."""

from plateau_jax.jacobians.sweep import *  # noqa: F401,F403  (the sweep API: jacobian_sweep, ...)
