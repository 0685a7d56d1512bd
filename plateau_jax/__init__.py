"""plateau_jax: activation plateaus in GPT-2, in JAX.

Core API::

    model = plateau_jax.load_gpt2("gpt2-large", center_writing_weights=True)
    logits, cache = plateau_jax.forward(model, ids, sites=["blocks.3.hook_resid_post"])
    prefix = plateau_jax.run_prefix(model, context_ids)
    logits, rec = plateau_jax.continue_from(model, prefix, x, layer=0, sites=[...])
"""

from plateau_jax.model.config import GPT2Config, UnsupportedConfigError
from plateau_jax.model.forward import (IDENTITY, Prefix, continue_from, embed_last, forward, run_block,
                                 run_prefix, unembedding)
from plateau_jax.model.interventions import freeze, linearized_mlp, replace_block
from plateau_jax.model.loading import (CheckpointError, apply_center_writing_weights, load_gpt2,
                                 save_gpt2)
from plateau_jax.model.model import GPT2, abstract_params, init_model
from plateau_jax.model.modules import GPT2LMHead, Hooks, gelu_new
from plateau_jax.model.sites import UnknownSiteError, all_sites, site
from plateau_jax.model import shipped as _shipped  # registers the shipped models (tiny-plateau)

__version__ = "0.1.0"
