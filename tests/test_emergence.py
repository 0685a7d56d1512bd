"""experiments.emergence: its MLP Jacobian norms, and one pair on the shipped model."""

import numpy as np
import pytest

import plateau_jax
from experiments import emergence
from plateau_jax import testing
from plateau_jax.plateaus import paths
from plateau_jax.plateaus import prompts


def test_mlp_jacobian_norms_match_finite_differences():
    model = plateau_jax.init_model(testing.tiny_config(), seed=1)
    x = np.random.default_rng(0).normal(size=(3, model.config.n_embd)).astype(np.float32)
    norms = emergence.mlp_jacobian_norms(model, 1, x)
    blk = model.block(1)
    import jax
    import jax.numpy as jnp
    from plateau_jax.model.layers import mlp_part

    def mlp_out(v):
        return mlp_part(blk, v[None, None], model.config)[0, 0]

    eps = 1e-2
    eye = jnp.eye(model.config.n_embd, dtype=jnp.float32)
    batched = jax.jit(jax.vmap(mlp_out))
    for i in range(3):
        fd = float(np.linalg.norm((batched(x[i] + eps * eye) - batched(x[i] - eps * eye)) / (2 * eps)))
        assert norms[i] == pytest.approx(fd, rel=2e-2)


def test_one_pair_on_the_shipped_model():
    model = plateau_jax.load_gpt2("tiny-plateau")
    pair = prompts.encode_pair(model.tokenizer, "The house was", " big", " in",
                               model.config.n_positions)
    alpha = paths.alpha_grid(8)
    res = emergence.analyse_pair(model, pair, 0, alpha, "slerp")
    r = np.asarray(res["r"])
    assert r[0] == 0.0 and r[-1] == pytest.approx(1.0)
    assert 1.0 <= res["S"] < 3.0  # no plateau in this small model (README)
    assert sorted(res["jacobian"], key=int) == [1, 2, 3, 4, 5]
    assert all(len(v["norms"]) == 8 and v["contrast"] >= 1.0 for v in res["jacobian"].values())
