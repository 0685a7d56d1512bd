"""The statistics this sweep borrows from the interpolation and Jacobian modules.

Everything the engine needs from issue 3 (``plateau_jax.metrics``: sharpness, boundary, slopes,
relative distance, KL) and issue 4 (``plateau_jax.mlp_jacobian``: exact MLP Jacobian Frobenius
norms via per-layer Gram matrices) goes through this one module, so the engine never imports
them directly. When those modules are present they are used; the fallbacks below are minimal
stand-ins with the same signatures, kept only until they land.
"""

from __future__ import annotations

try:  # issue 3
    from plateau_jax.metrics import boundary, kl_divergence, relative_distance, sharpness, slopes
    METRICS_SOURCE = "plateau_jax.metrics"
except ImportError:  # pragma: no cover - fallback until issue 3 is merged
    from plateau_jax.sweep._fallback import (boundary, kl_divergence, relative_distance,
                                             sharpness, slopes)
    METRICS_SOURCE = "plateau_jax.sweep._fallback"

try:  # issue 4
    from plateau_jax.mlp_jacobian import mlp_frobenius_gram, mlp_grams
    JACOBIAN_SOURCE = "plateau_jax.mlp_jacobian"
except ImportError:  # pragma: no cover - fallback until issue 4 is merged
    from plateau_jax.sweep._fallback import mlp_frobenius_gram, mlp_grams
    JACOBIAN_SOURCE = "plateau_jax.sweep._fallback"

__all__ = ["boundary", "kl_divergence", "relative_distance", "sharpness", "slopes",
           "mlp_frobenius_gram", "mlp_grams", "METRICS_SOURCE", "JACOBIAN_SOURCE"]
