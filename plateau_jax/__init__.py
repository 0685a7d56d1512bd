"""plateau_jax: activation plateaus in GPT-2, in JAX.

Core API::

    model = plateau_jax.load_model("gpt2-large", center_writing_weights=True)
    logits, cache = plateau_jax.forward(model, ids, sites=["blocks.3.hook_resid_post"])
    kv = plateau_jax.run_prefix(model, context_ids)
    logits, rec = plateau_jax.continue_from(model, kv, x, layer=0, sites=[...])
"""

from plateau_jax.model.config import GPT2Config, ModelConfig, UnsupportedConfigError
from plateau_jax.model.core import KVCache, MATMUL_PRECISIONS
from plateau_jax.model.forward import (continue_from, continue_stacked, embed_next_token, forward,
                                       identity_block, run_prefix)
from plateau_jax.model.interventions import freeze, linearized_mlp, replace_block
from plateau_jax.model.loading import (CheckpointError, apply_center_writing_weights, load_gpt2,
                                       load_model, save_gpt2, save_model)
from plateau_jax.model.model import GPT2, Model, init_model
from plateau_jax.model.params import abstract_params, block_params, unembedding
from plateau_jax.model.sites import UnknownSiteError, all_sites, site_name
from plateau_jax.model.shipped import gpt2_tokenizer  # (importing registers tiny-plateau)

# Names of the first release, kept for one release.
Prefix = KVCache
embed_last = embed_next_token
IDENTITY = identity_block
site = site_name

__version__ = "0.2.0"
