"""The statistics this sweep borrows from the interpolation and Jacobian modules.

Everything the engine needs from ``plateau_jax.metrics`` (sharpness, boundary, slopes, relative
distance, KL; used on the host) and ``plateau_jax.mlp_jacobian`` (exact MLP Jacobian Frobenius
norms via per-layer Gram matrices; used on device) goes through this one module.
"""

from __future__ import annotations

from plateau_jax.metrics import boundary, kl_divergence, relative_distance, sharpness, slopes
from plateau_jax.mlp_jacobian import mlp_frobenius_gram, mlp_grams

__all__ = ["boundary", "kl_divergence", "relative_distance", "sharpness", "slopes",
           "mlp_frobenius_gram", "mlp_grams"]
