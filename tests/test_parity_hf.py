"""Parity with transformers' PyTorch GPT2LMHeadModel on random weights (float32, <= 1e-4)."""

import numpy as np
import pytest
import torch

import plateau_jax
from conftest import random_ids, to_numpy, torch_gpt2

CONFIGS = {
    "custom_n_inner": dict(vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=3, n_inner=40),
    "eps_and_default_inner": dict(vocab_size=64, n_positions=12, n_embd=16, n_layer=3, n_head=2,
                                  layer_norm_epsilon=1e-3),
    "odd_vocab_no_scale": dict(vocab_size=131, n_positions=10, n_embd=20, n_layer=1, n_head=5,
                               scale_attn_weights=False),
}


def _save(model, directory, prefix: bool):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(state, f"{directory}/model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(f"{directory}/config.json")


@pytest.mark.parametrize("prefix", [True, False], ids=["prefixed", "bare"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_hidden_states_and_patterns_match_hf(tmp_path, name, prefix):
    kw = CONFIGS[name]
    ref = torch_gpt2(kw, seed=len(name))
    _save(ref, tmp_path, prefix)
    model = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    ids = random_ids(kw["vocab_size"], (2, kw["n_positions"]), seed=1)
    with torch.no_grad():
        out = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True,
                  output_attentions=True)
    n = kw["n_layer"]
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [
        f"blocks.{i}.attn.hook_pattern" for i in range(n)] + ["ln_final.hook_normalized"]
    logits, cache = plateau_jax.forward(model, ids, sites=sites)
    assert np.abs(np.asarray(logits) - to_numpy(out.logits)).max() <= 1e-4
    for i in range(n):
        np.testing.assert_allclose(cache[f"blocks.{i}.hook_resid_pre"], to_numpy(out.hidden_states[i]),
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(cache[f"blocks.{i}.attn.hook_pattern"],
                                   to_numpy(out.attentions[i]), atol=1e-5, rtol=0)
    # HF's last hidden state is after ln_f.
    np.testing.assert_allclose(cache["ln_final.hook_normalized"], to_numpy(out.hidden_states[n]),
                               atol=1e-4, rtol=0)


def test_every_block_site_matches_hf_submodules(tmp_path):
    """Internal sites (ln outputs, mlp pre/post, attn/mlp out) against torch forward hooks."""
    kw = CONFIGS["custom_n_inner"]
    ref = torch_gpt2(kw, seed=3)
    _save(ref, tmp_path, True)
    model = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    ids = random_ids(kw["vocab_size"], (1, 9), seed=2)
    got = {}
    blk = ref.transformer.h[1]
    hooks = [
        blk.ln_1.register_forward_hook(lambda m, i, o: got.__setitem__("ln1.hook_normalized", o)),
        blk.attn.register_forward_hook(lambda m, i, o: got.__setitem__("hook_attn_out", o[0])),
        blk.ln_2.register_forward_hook(lambda m, i, o: got.__setitem__("ln2.hook_normalized", o)),
        blk.mlp.c_fc.register_forward_hook(lambda m, i, o: got.__setitem__("mlp.hook_pre", o)),
        blk.mlp.act.register_forward_hook(lambda m, i, o: got.__setitem__("mlp.hook_post", o)),
        blk.mlp.register_forward_hook(lambda m, i, o: got.__setitem__("hook_mlp_out", o)),
        blk.register_forward_hook(lambda m, i, o: got.__setitem__(
            "hook_resid_post", o[0] if isinstance(o, tuple) else o)),
    ]
    with torch.no_grad():
        ref(torch.tensor(ids, dtype=torch.long))
    for h in hooks:
        h.remove()
    _, cache = plateau_jax.forward(model, ids, sites=[f"blocks.1.{k}" for k in got])
    for k, v in got.items():
        np.testing.assert_allclose(cache[f"blocks.1.{k}"], to_numpy(v), atol=1e-4, rtol=0, err_msg=k)
    mid = cache["blocks.1.hook_resid_post"] - cache["blocks.1.hook_mlp_out"]
    _, c2 = plateau_jax.forward(model, ids, sites=["blocks.1.hook_resid_mid"])
    np.testing.assert_allclose(c2["blocks.1.hook_resid_mid"], mid, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [pytest.param("bfloat16", 0.25, marks=pytest.mark.slow),
                                        ("float16", 0.05)])
def test_half_precision_close_to_float32(tmp_path, dtype, atol):
    kw = CONFIGS["custom_n_inner"]
    ref = torch_gpt2(kw, seed=5)
    _save(ref, tmp_path, True)
    m32 = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    m16 = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, dtype=dtype)
    assert str(m16.dtype) == dtype
    ids = random_ids(kw["vocab_size"], (1, 8), seed=4)
    l32, _ = plateau_jax.forward(m32, ids)
    l16, _ = plateau_jax.forward(m16, ids)
    assert l16.dtype == m16.dtype
    scale = float(np.abs(np.asarray(l32)).max())
    assert np.abs(np.asarray(l16, np.float32) - np.asarray(l32)).max() <= atol * scale
