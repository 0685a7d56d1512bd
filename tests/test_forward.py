"""Full forward, prefix cache + last-token continuation, interventions, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plateau_jax
from plateau_jax import UnknownSiteError, site
from plateau_jax.model import core
from conftest import random_ids, right_padded_contexts

LAYERS = 3
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def model(plateau_model):
    """conftest's tiny model: weights x3 and random norms and biases make every parameter and
    nonlinearity matter."""
    assert plateau_model.config.n_layer == LAYERS
    return plateau_model


@pytest.fixture(scope="module")
def ids(model):
    return random_ids(model.config.vocab_size, (7,), seed=5)


def _substituted(model, ids, name, values, sites):
    """Reference: a full forward per row, with ``name`` at the last position set to that row."""
    batch = np.repeat(ids[None], len(values), axis=0)
    return plateau_jax.forward(model, batch, sites=sites, patches={name: values})


@pytest.mark.parametrize("layer,where", [(0, "resid_pre"), pytest.param(0, "resid_post", marks=SLOW),
                                         (1, "resid_mid"), pytest.param(2, "resid_pre", marks=SLOW),
                                         pytest.param(2, "resid_post", marks=SLOW)])
def test_continuation_equals_full_forward_with_substitution(model, ids, layer, where):
    name = site(layer, where)
    _, clean = plateau_jax.forward(model, ids, sites=[name])
    rng = np.random.default_rng(layer)
    x = clean[name][0, -1] + rng.normal(size=(5, model.config.n_embd)).astype(np.float32)
    downstream = [site(l, s) for l in range(layer + 1, LAYERS)
                  for s in ("hook_attn_out", "mlp.hook_pre", "hook_resid_post")]
    want_logits, want = _substituted(model, ids, name, x, downstream + ["ln_final.hook_normalized"])
    prefix = plateau_jax.run_prefix(model, ids[:-1])
    logits, rec = plateau_jax.continue_from(model, prefix, x, layer, where,
                                            sites=downstream + ["ln_final.hook_normalized"])
    assert np.abs(np.asarray(logits) - np.asarray(want_logits[:, -1])).max() <= 1e-5
    for s in downstream:
        assert np.abs(np.asarray(rec[s]) - np.asarray(want[s][:, -1])).max() <= 1e-5, s


def test_embed_last_starts_the_whole_model(model, ids):
    logits, _ = plateau_jax.forward(model, ids)
    prefix = plateau_jax.run_prefix(model, ids[:-1])
    x = plateau_jax.embed_last(model, prefix, np.array([ids[-1]]))
    got, rec = plateau_jax.continue_from(model, prefix, x, 0, "resid_pre",
                                         sites=["blocks.1.attn.hook_pattern"])
    assert np.abs(np.asarray(got[0]) - np.asarray(logits[0, -1])).max() <= 1e-5
    _, full = plateau_jax.forward(model, ids, sites=["blocks.1.attn.hook_pattern"])
    np.testing.assert_allclose(rec["blocks.1.attn.hook_pattern"][0],
                               full["blocks.1.attn.hook_pattern"][0, :, -1], atol=1e-6)


@pytest.mark.slow
def test_batched_padded_prefixes(model):
    """Contexts of different lengths, right-padded, equal their unpadded single runs."""
    ctx, padded = right_padded_contexts(model.config.vocab_size, (3, 6))
    prefix = plateau_jax.run_prefix(model, padded, lengths=[3, 6])
    last = np.array([[4, 9], [17, 2]])
    x = plateau_jax.embed_last(model, prefix, last)  # [2 contexts, 2 rows, d]
    logits, _ = plateau_jax.continue_from(model, prefix, x, 0, "resid_pre")
    for i, c in enumerate(ctx):
        for j in range(2):
            want, _ = plateau_jax.forward(model, np.append(c, last[i, j]))
            assert np.abs(np.asarray(logits[i, j]) - np.asarray(want[0, -1])).max() <= 1e-5


@pytest.mark.slow
def test_continuation_cost_does_not_grow_with_context_beyond_attention(model):
    """FLOPs of the compiled continuation: the growth from a 4- to a 60-token context is the
    attention read alone (2 matmuls of [H, 1, d_head] x [H, d_head, T] per layer and row)."""
    cfg = model.config
    costs = {}
    for T in (4, 60):
        prefix = plateau_jax.run_prefix(model, np.zeros(T, np.int32))
        x = jnp.zeros((1, 8, cfg.n_embd))
        fn = lambda p, x: core.continue_from(model.params, cfg, p, x, 0)
        costs[T] = jax.jit(fn).lower(prefix, x).compile().cost_analysis()["flops"]
    per_row_growth = (costs[60] - costs[4]) / 8
    attention_read = cfg.n_layer * 2 * 2 * cfg.n_embd * (60 - 4)  # qk and pv, 2 flops per MAC
    assert per_row_growth <= 1.5 * attention_read


def test_freezing_to_clean_values_reproduces_clean_run(model, ids):
    sites = [site(l, "mlp_out") for l in range(LAYERS)] + [site(l, "attn_out") for l in range(LAYERS)]
    clean_logits, clean = plateau_jax.forward(model, ids, sites=sites)
    patches = {**plateau_jax.freeze("mlp", {l: clean[site(l, "mlp_out")][:, -1] for l in range(LAYERS)},
                                    model.config),
               **plateau_jax.freeze("attn", {l: clean[site(l, "attn_out")][:, -1] for l in range(LAYERS)},
                                    model.config)}
    logits, _ = plateau_jax.forward(model, ids, patches=patches)
    np.testing.assert_allclose(logits, clean_logits, atol=1e-6)
    # freezing to another value does change the output, and only from the last position on
    other = {site(1, "mlp_out"): jnp.ones((1, model.config.n_embd))}
    changed, _ = plateau_jax.forward(model, ids, patches=other)
    assert np.abs(np.asarray(changed[0, -1] - clean_logits[0, -1])).max() > 1e-3
    np.testing.assert_allclose(changed[0, :-1], clean_logits[0, :-1], atol=1e-6)


@pytest.mark.slow
def test_identity_block_equals_skipping_it(model, ids):
    p = model.params
    # reference: a 2-layer model built from blocks 0 and 2 only
    short_cfg = model.config.replace(n_layer=LAYERS - 1)
    blocks = jax.tree_util.tree_map(lambda a: a[np.array([0, 2])], p["blocks"])
    short = plateau_jax.Model(params={**p, "blocks": blocks}, config=short_cfg)
    want, _ = plateau_jax.forward(short, ids)
    got, rec = plateau_jax.forward(model, ids, swaps={"blocks.1": plateau_jax.IDENTITY},
                                   sites=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(rec["blocks.1.hook_resid_pre"], rec["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="not computed"):
        plateau_jax.forward(model, ids, swaps={"blocks.1": plateau_jax.IDENTITY},
                            sites=["blocks.1.mlp.hook_post"])


@pytest.mark.slow
def test_swapped_block_params_and_continuation_with_swaps(model, ids):
    p = model.params
    swapped = model.with_block(2, model.block(0))
    # reference: block 0 applied to block 2's input is what block 0 does to block 0's input
    _, c = plateau_jax.forward(model, ids, sites=["blocks.2.hook_resid_pre"])
    zero_in = plateau_jax.forward(model, ids, patches={"hook_embed": c["blocks.2.hook_resid_pre"]
                                                       - model.params["pos_embed"]["W_pos"][:7]},
                                  sites=["blocks.0.hook_resid_post"])[1]["blocks.0.hook_resid_post"]
    _, got = plateau_jax.forward(swapped, ids, sites=["blocks.2.hook_resid_post"])
    np.testing.assert_allclose(got["blocks.2.hook_resid_post"], zero_in, atol=1e-5)
    assert np.array_equal(model.params["blocks"]["mlp"]["W_in"], p["blocks"]["mlp"]["W_in"])
    assert not np.array_equal(swapped.params["blocks"]["mlp"]["W_in"][2], p["blocks"]["mlp"]["W_in"][2])
    with pytest.raises(ValueError, match="do not match a block"):
        plateau_jax.replace_block(p, 1, {"ln1": model.block(0)["ln1"]})
    # swaps apply in the continuation exactly as in the full forward
    swaps = {"blocks.1": lambda x: 0.5 * x}
    full, _ = plateau_jax.forward(model, ids, swaps=swaps)
    prefix = plateau_jax.run_prefix(model, ids[:-1], swaps=swaps)
    x = plateau_jax.embed_last(model, prefix, ids[-1:])
    cont, _ = plateau_jax.continue_from(model, prefix, x, 0, "resid_pre", swaps=swaps)
    np.testing.assert_allclose(cont[0], full[0, -1], atol=1e-5)


@pytest.mark.slow
def test_linearized_mlp_is_exact_at_its_point_and_affine(model, ids):
    name = "blocks.1.ln2.hook_normalized"
    _, c = plateau_jax.forward(model, ids, sites=[name, "blocks.1.hook_mlp_out"])
    at = c[name][0, -1]
    fn = plateau_jax.linearized_mlp(model.params, model.config, 1, at)
    np.testing.assert_allclose(fn(at[None])[0], c["blocks.1.hook_mlp_out"][0, -1], atol=1e-5)
    u, v = jnp.ones_like(at), jnp.arange(at.shape[0], dtype=at.dtype) / at.shape[0]
    np.testing.assert_allclose(fn(at + u + v) - fn(at + u), fn(at + v) - fn(at), atol=1e-4)
    _, swapped = plateau_jax.forward(model, ids, swaps={"blocks.1.mlp": fn},
                                     sites=["blocks.1.hook_mlp_out"])
    np.testing.assert_allclose(swapped["blocks.1.hook_mlp_out"][0, -1],
                               c["blocks.1.hook_mlp_out"][0, -1], atol=1e-5)


@pytest.mark.slow
def test_interventions_compose_with_jit_vmap_and_jacfwd(model, ids):
    name = site(0, "resid_post")
    prefix = plateau_jax.run_prefix(model, ids[:-1])
    _, clean = plateau_jax.forward(model, ids, sites=[name, site(1, "mlp_out")])
    x0 = clean[name][0, -1]
    frozen = plateau_jax.freeze("mlp", {1: clean[site(1, "mlp_out")][0, -1]}, model.config)

    def out(x):
        logits, _ = plateau_jax.continue_from(model, prefix, x[None], 0, "resid_post", patches=frozen)
        return logits[0, :5]

    jac = jax.jit(jax.jacfwd(out))(x0)
    eps = 1e-2
    e = jnp.zeros_like(x0).at[3].set(eps)
    fd = (out(x0 + e) - out(x0 - e)) / (2 * eps)
    np.testing.assert_allclose(jac[:, 3], fd, atol=2e-3)
    batched = jax.vmap(out)(jnp.stack([x0, x0 + 1.0]))
    np.testing.assert_allclose(batched[0], out(x0), atol=1e-5)


def test_bad_inputs(model, ids):
    cfg = model.config
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plateau_jax.forward(model, np.array([1, 2, cfg.vocab_size]))
    with pytest.raises(ValueError, match="exceeds n_positions"):
        plateau_jax.forward(model, np.zeros(cfg.n_positions + 1, np.int32))
    with pytest.raises(UnknownSiteError, match="blocks.1.hook_resid_post"):
        plateau_jax.forward(model, ids, sites=["blocks.1.hook_resid_psot"])
    with pytest.raises(UnknownSiteError, match="out of range"):
        plateau_jax.forward(model, ids, sites=[f"blocks.{LAYERS}.hook_resid_post"])
    prefix = plateau_jax.run_prefix(model, ids[:-1])
    x = np.zeros((2, cfg.n_embd), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        plateau_jax.continue_from(model, prefix, x, LAYERS)
    with pytest.raises(ValueError, match="upstream"):
        plateau_jax.continue_from(model, prefix, x, 1, sites=["blocks.0.hook_mlp_out"])
    with pytest.raises(ValueError, match="shape"):
        plateau_jax.continue_from(model, prefix, x[:, :3], 0)
    with pytest.raises(ValueError, match="patch .* not computed"):  # upstream of the entry
        plateau_jax.continue_from(model, prefix, x, 1, patches={"blocks.0.hook_mlp_out": x})
    with pytest.raises(ValueError, match="patch .* not computed"):  # inside a swapped block
        plateau_jax.forward(model, ids, swaps={"blocks.1": plateau_jax.IDENTITY},
                            patches={"blocks.1.hook_mlp_out": x[:1]})
    for bad in ([0], [7], [3, 3]):
        with pytest.raises(ValueError, match="lengths must be"):
            plateau_jax.run_prefix(model, ids[None, :6], lengths=bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plateau_jax.embed_last(model, prefix, [cfg.vocab_size])
    with pytest.raises(ValueError, match="swap key"):
        plateau_jax.forward(model, ids, swaps={"block.1": plateau_jax.IDENTITY})
    with pytest.raises(ValueError, match="freeze sublayer"):
        plateau_jax.freeze("ln", {0: x[0]}, cfg)
    with pytest.raises(ValueError, match="Unsupported dtype"):
        model.astype("float64")
