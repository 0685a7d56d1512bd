"""plateau_jax: activation plateaus in transformers, in JAX.

    import plateau_jax as pj
    model = pj.load_model("gpt2-large", center_writing_weights=True)
    cache = pj.run_prefix(model, model.to_tokens("The house was"))
    a, b = pj.endpoint_activations(model, cache, [1263, 287], layers=[0])[0]   # " big", " in"
    run = pj.interpolation_run(model, cache, a, b, layer=0, alpha=pj.alpha_grid(50))
    r = pj.metrics.relative_distance(run.logits)                    # [50]: 0 at A, 1 at B

The public API, grouped by what a user does; everything else lives in the subpackages
(``plateau_jax.model``, ``.plateaus``, ``.jacobians``, ``.sweep``, ``.plotting``).
"""

# Load and save models.
from plateau_jax.model.config import GPT2Config, ModelConfig, UnsupportedConfigError
from plateau_jax.model.loading import (CheckpointError, apply_center_writing_weights, load_gpt2,
                                       load_model, save_gpt2, save_model)
from plateau_jax.model.model import GPT2, Model, init_model
from plateau_jax.model.shipped import gpt2_tokenizer  # (importing registers tiny-plateau)

# Run them: full forward, prefix cache and next-token continuation.
from plateau_jax.model.core import MATMUL_PRECISIONS, KVCache
from plateau_jax.model.forward import (continue_from, continue_stacked, embed_next_token, forward,
                                       identity_block, run_prefix)
from plateau_jax.model.sites import UnknownSiteError, all_sites, site_name

# Intervene: freeze components, swap blocks or MLPs.
from plateau_jax.model.interventions import freeze, linearized_mlp
from plateau_jax.model.params import block_params, replace_block

# Interpolate between prompts and measure.
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus.interpolation import (InterpolationRun, endpoint_activations,
                                                freeze_patches, interpolation_run)
from plateau_jax.plateaus.paths import alpha_grid, interpolate
from plateau_jax.plateaus.prompts import PromptPair, encode_pair

# Jacobians along paths.
from plateau_jax.jacobians.sweep import SweepOptions, jacobian_sweep, mlp_grams_for

# Many pairs, sharded over devices.
from plateau_jax.sweep import SweepEngine, SweepSpec

# Names of the first release, kept for one release.
Prefix = KVCache
embed_last = embed_next_token
IDENTITY = identity_block
site = site_name

__version__ = "0.2.0"

__all__ = [
    # load
    "ModelConfig", "Model", "load_model", "save_model", "init_model", "gpt2_tokenizer",
    "apply_center_writing_weights", "CheckpointError", "UnsupportedConfigError",
    # run
    "forward", "run_prefix", "KVCache", "embed_next_token", "continue_from", "continue_stacked",
    "MATMUL_PRECISIONS", "site_name", "all_sites", "UnknownSiteError",
    # intervene
    "freeze", "identity_block", "linearized_mlp", "block_params", "replace_block",
    # interpolate
    "alpha_grid", "interpolate", "endpoint_activations", "interpolation_run", "InterpolationRun",
    "freeze_patches", "metrics", "PromptPair", "encode_pair",
    # Jacobians
    "jacobian_sweep", "SweepOptions", "mlp_grams_for",
    # sweep
    "SweepSpec", "SweepEngine",
    # first-release names (aliases)
    "GPT2Config", "GPT2", "load_gpt2", "save_gpt2", "Prefix", "embed_last", "IDENTITY", "site",
]
