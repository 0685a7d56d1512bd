"""GPT-NeoX (Pythia) and Llama-style (Llama, Qwen2, Mistral) checkpoints: parity with
transformers' PyTorch models on random tiny configs (float32: logits, every hidden state and
every block-internal site <= 1e-4), checkpoint layouts, round trips and refused configs."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import plateau_jax
from plateau_jax import UnsupportedConfigError
from conftest import random_ids, to_numpy, torch_causal_lm

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# (model_type, transformers config kwargs): between them GQA and MQA, partial rotary, parallel
# residual on and off, biases on and off, tied and untied unembeddings, llama3 and linear rope
# scaling, a head_dim other than d_model / n_head.
CONFIGS = {
    "neox_parallel_quarter_rotary": ("gpt_neox", dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, rotary_pct=0.25, max_position_embeddings=32)),
    "neox_sequential_nobias_tied_linear_rope": ("gpt_neox", dict(
        vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False,
        attention_bias=False, hidden_act="gelu_new", tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=32)),
    "llama_gqa_llama3_rope": ("llama", dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, rope_theta=500.0, rope_scaling=LLAMA3,
        max_position_embeddings=128)),
    "llama_mqa_biases_head_dim_tied": ("llama", dict(
        vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=10, intermediate_size=36, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=32)),
    "qwen2_gqa_qkv_bias": ("qwen2", dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, rope_theta=1e6, max_position_embeddings=64)),
    "mistral_gqa_no_window": ("mistral", dict(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, sliding_window=None,
        max_position_embeddings=32)),
}
T = 12
# Run by `pytest -m "not slow"`; the other configs are marked slow (CI runs every test).
FAST = ("neox_parallel_quarter_rotary", "llama_gqa_llama3_rope")
PARITY_PARAMS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(CONFIGS)]


def _layers(ref):
    body = ref.gpt_neox if hasattr(ref, "gpt_neox") else ref.model
    return body.layers


def _hooks(ref, layer, got):
    """Forward hooks on transformers' submodules of one layer that store our site names."""
    blk = _layers(ref)[layer]
    put = lambda name: (lambda m, i, o: got.__setitem__(name, o[0] if isinstance(o, tuple) else o))
    mods = {"ln1.hook_normalized": blk.input_layernorm,
            "ln2.hook_normalized": blk.post_attention_layernorm,
            "hook_attn_out": getattr(blk, "attention", None) or blk.self_attn,
            "hook_mlp_out": blk.mlp, "hook_resid_post": blk}
    if hasattr(blk.mlp, "gate_proj"):  # SwiGLU: hook_pre is the gate, hook_pre_linear the up
        mods.update({"mlp.hook_pre": blk.mlp.gate_proj, "mlp.hook_pre_linear": blk.mlp.up_proj})
        pre = blk.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: got.__setitem__("mlp.hook_post", a[0]))
    else:
        mods.update({"mlp.hook_pre": blk.mlp.dense_h_to_4h, "mlp.hook_post": blk.mlp.act})
        pre = None
    return [m.register_forward_hook(put(n)) for n, m in mods.items()] + [pre] * (pre is not None)


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("name", PARITY_PARAMS)
def test_logits_hidden_states_and_block_sites_match_transformers(tmp_path, name):
    model_type, kw = CONFIGS[name]
    ref = torch_causal_lm(model_type, kw, seed=len(name))
    ref.save_pretrained(tmp_path)
    model = plateau_jax.load_model(str(tmp_path), require_tokenizer=False)
    cfg = model.config
    assert cfg.family == ("gpt_neox" if model_type == "gpt_neox" else "llama")
    ids = random_ids(kw["vocab_size"], (2, T), seed=1)
    n, probe = kw["num_hidden_layers"], kw["num_hidden_layers"] - 1
    got = {}
    hooks = _hooks(ref, probe, got)
    with torch.no_grad():
        out = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True,
                  output_attentions=True)
    for h in hooks:
        h.remove()
    sites = ([f"blocks.{i}.hook_resid_pre" for i in range(n)]
             + [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
             + ["ln_final.hook_normalized"] + [f"blocks.{probe}.{k}" for k in got])
    logits, cache = plateau_jax.forward(model, ids, sites=sites)
    errs = {"logits": _max_err(logits, to_numpy(out.logits))}
    for i in range(n):  # HF's hidden states: each block's input, then the final norm's output
        errs[f"hidden {i}"] = _max_err(cache[f"blocks.{i}.hook_resid_pre"], to_numpy(out.hidden_states[i]))
        errs[f"pattern {i}"] = _max_err(cache[f"blocks.{i}.attn.hook_pattern"], to_numpy(out.attentions[i]))
    errs[f"hidden {n}"] = _max_err(cache["ln_final.hook_normalized"], to_numpy(out.hidden_states[n]))
    for k, v in got.items():
        errs[k] = _max_err(cache[f"blocks.{probe}.{k}"], to_numpy(v))
    print(f"{name}: max |ours - transformers| " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-4, errs
    assert float(np.abs(to_numpy(out.logits)).max()) > 1.0  # not a trivially small output
    if cfg.has_resid_mid:
        _, c2 = plateau_jax.forward(model, ids, sites=[f"blocks.{probe}.hook_resid_mid"])
        np.testing.assert_allclose(c2[f"blocks.{probe}.hook_resid_mid"],
                                   to_numpy(got["hook_resid_post"] - got["hook_mlp_out"]), atol=1e-5)
    else:
        with pytest.raises(plateau_jax.UnknownSiteError, match="parallel residual"):
            plateau_jax.forward(model, ids, sites=[f"blocks.{probe}.hook_resid_mid"])


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _legacy_config(saved: dict) -> dict:
    """The same config.json as the hub's older files spell it (rotary keys at the top level)."""
    raw = {k: v for k, v in saved.items() if k != "rope_parameters"}
    rope = dict(saved["rope_parameters"])
    kind = rope.pop("rope_type")
    if saved["model_type"] == "gpt_neox":
        raw["rotary_pct"] = rope.pop("partial_rotary_factor")
        raw["rotary_emb_base"] = rope.pop("rope_theta")
    else:
        raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {"type": kind, **rope} if kind != "default" else None
    return raw


@pytest.mark.parametrize("name", ["neox_parallel_quarter_rotary", "llama_gqa_llama3_rope"])
def test_hub_layouts_buffers_shards_and_round_trips(tmp_path, name):
    """Legacy config keys, the hub's tensor names with buffers, a sharded checkpoint and our own
    save all load to identical params; transformers reads what we save."""
    from safetensors.numpy import load_file, save_file

    model_type, kw = CONFIGS[name]
    ref = torch_causal_lm(model_type, kw, seed=7)
    ref.save_pretrained(tmp_path / "hf")
    base = plateau_jax.load_model(str(tmp_path / "hf"), require_tokenizer=False)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    L = kw["num_hidden_layers"]
    if model_type == "gpt_neox":  # transformers >= 5 saves embed_out as lm_head; old files carry buffers
        tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
        extra = {f"gpt_neox.layers.{i}.attention.{b}": np.ones((1, 1, 4, 4), bool)
                 for i in range(L) for b in ("bias", "masked_bias")}
        extra.update({f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq": np.ones(2, np.float32)
                      for i in range(L)})
    else:
        extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)
                 for i in range(L)}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({**tensors, **extra}, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text(json.dumps(_legacy_config(saved)))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(tensors)
    weight_map = {}
    for j, part in enumerate((keys[::2], keys[1::2])):
        fname = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / fname))
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(saved))
    ours = tmp_path / "ours"
    plateau_jax.save_model(base, str(ours))
    for d in (legacy, sharded, ours):
        m = plateau_jax.load_model(str(d), require_tokenizer=False)
        assert m.config == base.config, d
        assert _tree_equal(m.params, base.params), d
    # TransformerLens' weight centring: exact for LayerNorm models, skipped for RMSNorm ones
    centred = plateau_jax.load_model(str(tmp_path / "hf"), require_tokenizer=False,
                                     center_writing_weights=True)
    if model_type == "gpt_neox":
        ids = random_ids(kw["vocab_size"], (1, T), seed=3)
        site = "blocks.1.hook_resid_post"
        (lc, cc), (lb, cb) = (plateau_jax.forward(m, ids, sites=[site]) for m in (centred, base))
        assert _max_err(lc, lb) <= 1e-4
        b = np.asarray(cb[site])
        np.testing.assert_allclose(cc[site], b - b.mean(-1, keepdims=True), atol=1e-4)
    else:
        assert _tree_equal(centred.params, base.params)
    import transformers
    again = getattr(transformers, type(ref).__name__).from_pretrained(
        str(ours), attn_implementation="eager").eval()
    ids = torch.tensor(random_ids(kw["vocab_size"], (1, T), seed=2), dtype=torch.long)
    with torch.no_grad():
        assert _max_err(again(ids).logits, ref(ids).logits) <= 1e-5


def test_bfloat16_checkpoint_loads_as_stored_with_dtype_auto(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    model_type, kw = CONFIGS["qwen2_gqa_qkv_bias"]
    ref = torch_causal_lm(model_type, kw, seed=3)
    ref.save_pretrained(tmp_path)
    flat = load_file(str(tmp_path / "model.safetensors"))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
    save_file(bf16, str(tmp_path / "model.safetensors"))
    auto = plateau_jax.load_model(str(tmp_path), require_tokenizer=False, dtype="auto")
    assert str(auto.dtype) == "bfloat16"
    assert all(x.dtype == np.dtype(ml_dtypes.bfloat16) for x in jax.tree_util.tree_leaves(auto.params))
    np.testing.assert_array_equal(np.asarray(auto.params["blocks"]["attn"]["b_K"][1]).ravel(),
                                  bf16["model.layers.1.self_attn.k_proj.bias"])
    f32 = plateau_jax.load_model(str(tmp_path), require_tokenizer=False)  # float32 stays the default
    assert str(f32.dtype) == "float32"
    ids = random_ids(kw["vocab_size"], (1, T), seed=4)
    l16 = np.asarray(plateau_jax.forward(auto, ids)[0], np.float32)
    l32 = np.asarray(plateau_jax.forward(f32, ids)[0])
    assert np.abs(l16 - l32).max() <= 0.1 * np.abs(l32).max()


@pytest.mark.parametrize("raw,features", [
    ({"model_type": "gpt_neox", "rotary_pct": 0.4, "hidden_act": "quick_gelu",
      "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     ["rotary_pct=0.4", "hidden_act='quick_gelu'", "'dynamic'"]),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
      "partial_rotary_factor": 0.5, "hidden_act": "tanh", "is_encoder_decoder": True},
     ["'yarn'", "partial_rotary_factor=0.5", "hidden_act='tanh'", "is_encoder_decoder"]),
    ({"model_type": "qwen2", "use_sliding_window": True, "rope_scaling": {"rope_type": "longrope"}},
     ["use_sliding_window", "'longrope'"]),
    ({"model_type": "mistral", "sliding_window": 8, "rope_scaling": {"rope_type": "linear"}},
     ["sliding_window=8", "without ['factor']"]),
])
def test_unsupported_configs_are_refused_in_one_error(tmp_path, raw, features):
    sizes = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=32)
    (tmp_path / "config.json").write_text(json.dumps({**sizes, **raw}))
    with pytest.raises(UnsupportedConfigError) as e:
        plateau_jax.load_model(str(tmp_path))
    for f in features:
        assert f in str(e.value), (f, str(e.value))


def test_mistral_window_that_never_binds_is_read_as_llama():
    raw = dict(model_type="mistral", vocab_size=50, hidden_size=32, num_hidden_layers=1,
               num_attention_heads=8, intermediate_size=24, max_position_embeddings=32,
               sliding_window=32)
    cfg = plateau_jax.ModelConfig.from_hf_dict(raw)
    # transformers' MistralConfig defaults to 8 key/value heads; Mistral has no biases
    assert (cfg.family, cfg.n_kv_head, cfg.attn_bias, cfg.mlp_bias) == ("llama", 8, False, False)
    assert cfg.to_hf_dict()["model_type"] == "llama"
