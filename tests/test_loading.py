"""Loader: naming variants, sharding, LN-free, weight centring, the hub cache path, pickle opt-in,
and every bad input's error."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import plateau_jax
from plateau_jax import CheckpointError, UnsupportedConfigError
from conftest import random_ids, to_numpy, torch_gpt2

KW = dict(vocab_size=50, n_positions=12, n_embd=16, n_layer=2, n_head=2, n_inner=20)


def _write(directory, state, config_kwargs, extra_config=None):
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, f"{directory}/model.safetensors")
    cfg = {"model_type": "gpt2", **config_kwargs, **(extra_config or {})}
    with open(f"{directory}/config.json", "w") as f:
        json.dump(cfg, f)


def _ref_logits(ref, ids):
    with torch.no_grad():
        return to_numpy(ref(torch.tensor(ids, dtype=torch.long)).logits)


@pytest.fixture(scope="module")
def ref():
    return torch_gpt2(KW, seed=11)


@pytest.fixture(scope="module")
def ids():
    return random_ids(KW["vocab_size"], (2, 7), seed=3)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_naming_variants_load_identically(tmp_path, ref, ids):
    full = ref.state_dict()
    variants = {
        # transformers' own save: prefixed keys, tied lm_head omitted.
        "prefixed": {k: v for k, v in full.items() if k != "lm_head.weight"},
        "bare": {k.removeprefix("transformer."): v for k, v in full.items() if k != "lm_head.weight"},
        # old checkpoints: causal-mask buffers and an explicit (tied) lm_head.
        "buffers_and_lm_head": {**full, **{f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 12, 12)
                                           for i in range(2)},
                                **{f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4)
                                   for i in range(2)}},
    }
    want = _ref_logits(ref, ids)
    loaded = []
    for name, state in variants.items():
        _write(tmp_path / name, state, KW)
        m = plateau_jax.load_gpt2(str(tmp_path / name), require_tokenizer=False)
        logits, _ = plateau_jax.forward(m, ids)
        assert np.abs(np.asarray(logits) - want).max() <= 1e-4, name
        loaded.append(m.params)
    assert all(_tree_equal(loaded[0], p) for p in loaded[1:])


def test_sharded_safetensors(tmp_path, ref, ids):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp_path / fname)
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    m = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    assert np.abs(np.asarray(plateau_jax.forward(m, ids)[0]) - _ref_logits(ref, ids)).max() <= 1e-4
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)


def test_untied_lm_head(tmp_path, ids):
    ref = torch_gpt2({**KW, "tie_word_embeddings": False}, seed=4)
    _write(tmp_path, ref.state_dict(), {**KW, "tie_word_embeddings": False})
    m = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    assert not np.array_equal(m.params["unembed"]["W_U"], m.params["embed"]["W_E"].T)
    assert np.abs(np.asarray(plateau_jax.forward(m, ids)[0]) - _ref_logits(ref, ids)).max() <= 1e-4


def test_layernorm_free_checkpoint_loads_with_identity_layernorms(tmp_path, ids):
    """LN-free checkpoints (huge eps, LN weight 1e6) load with every LayerNorm as the identity,
    which equals the PyTorch model with its LayerNorms replaced by nn.Identity."""
    kw = {**KW, "layer_norm_epsilon": 1e12}
    ref = torch_gpt2(kw, seed=6)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.fill_(1e6 if name.endswith("weight") else 0.0)
    _write(tmp_path, {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, kw)
    m = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    assert m.config.ln_mode == "identity"
    for blk in ref.transformer.h:
        blk.ln_1, blk.ln_2 = torch.nn.Identity(), torch.nn.Identity()
    ref.transformer.ln_f = torch.nn.Identity()
    want = _ref_logits(ref, ids)
    got = np.asarray(plateau_jax.forward(m, ids)[0])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    normal = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, ln_mode="normal")
    assert normal.config.ln_mode == "normal"
    # identity mode warns when the LayerNorms carry a real affine part it drops
    assert plateau_jax.model.loading._warn_if_identity_drops_affine(m.params, m.config) == 0.0
    p = {**m.params, "ln_final": {"w": m.params["ln_final"]["w"] * 1.5,
                                  "b": m.params["ln_final"]["b"]}}
    assert plateau_jax.model.loading._warn_if_identity_drops_affine(p, m.config) == pytest.approx(0.5)
    # the mode survives a save/load round trip, even on a normal-eps checkpoint
    forced = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, ln_mode="identity")
    plateau_jax.save_gpt2(forced.replace(config=forced.config.replace(norm_eps=1e-5)),
                          str(tmp_path / "again"))
    assert plateau_jax.load_gpt2(str(tmp_path / "again"), require_tokenizer=False).config.ln_mode == "identity"


def test_center_writing_weights(tmp_path, ref, ids):
    _write(tmp_path, {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, KW)
    plain = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    centred = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, center_writing_weights=True)
    sites = [f"blocks.{i}.{s}" for i in range(2) for s in
             ("hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_pre", "ln2.hook_normalized")]
    lp, cp = plateau_jax.forward(plain, ids, sites=sites)
    lc, cc = plateau_jax.forward(centred, ids, sites=sites)
    np.testing.assert_allclose(lc, lp, atol=1e-4)  # logits unchanged
    for s in sites:
        a, b = np.asarray(cp[s]), np.asarray(cc[s])
        if "resid" in s or s.endswith("_out"):  # writes are mean-free: original minus its mean
            np.testing.assert_allclose(b, a - a.mean(-1, keepdims=True), atol=1e-4, err_msg=s)
            assert np.abs(b.mean(-1)).max() < 1e-5
        else:  # LayerNorm outputs and what follows them are unchanged
            np.testing.assert_allclose(b, a, atol=1e-4, err_msg=s)
    # plain params untouched, the unembedding keeps the uncentred embedding
    np.testing.assert_array_equal(centred.params["unembed"]["W_U"], plain.params["embed"]["W_E"].T)
    # the public, pure form gives the same tree and leaves its input as it was
    before = jax.tree.map(np.array, plain.params)
    params, config = plateau_jax.apply_center_writing_weights(plain.params, plain.config)
    assert not config.tie_embeddings
    jax.tree.map(np.testing.assert_array_equal, params, centred.params)
    jax.tree.map(np.testing.assert_array_equal, plain.params, before)


def _hub_cache(tmp_path, src, repo="test-org/tiny-gpt2"):
    """An HF hub cache holding ``repo`` (refs/main -> one snapshot), as huggingface_hub lays it out."""
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
    shutil.copytree(src, snap)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(sha)
    return str(cache), repo


def test_hub_id_resolves_from_local_cache(tmp_path, tiny_dir, tiny_model):
    cache, repo = _hub_cache(tmp_path, tiny_dir)
    m = plateau_jax.load_gpt2(repo, cache_dir=cache, local_files_only=True)
    assert _tree_equal(m.params, tiny_model.params)
    assert m.tokenizer("The house was big")["input_ids"] == \
        tiny_model.tokenizer("The house was big")["input_ids"]
    with pytest.raises(CheckpointError, match="local directory"):
        plateau_jax.load_gpt2("test-org/not-cached", cache_dir=cache, local_files_only=True)


def test_pickle_only_checkpoint_needs_opt_in(tmp_path, ref, ids):
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False)
    m = plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, allow_pickle=True)
    assert np.abs(np.asarray(plateau_jax.forward(m, ids)[0]) - _ref_logits(ref, ids)).max() <= 1e-4


def test_pickle_reader_refuses_arbitrary_globals(tmp_path):
    torch.save({"w": torch.ones(2), "evil": os.getcwd}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    with pytest.raises(Exception, match="refusing to load"):
        plateau_jax.load_gpt2(str(tmp_path), require_tokenizer=False, allow_pickle=True)


def test_bad_inputs_give_clear_errors(tmp_path, tiny_dir, ref):
    with pytest.raises(CheckpointError, match="No such model directory"):
        plateau_jax.load_gpt2(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a valid hub id|No such model"):
        plateau_jax.load_gpt2("not a model name!")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        plateau_jax.load_gpt2(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        plateau_jax.load_gpt2(str(empty))
    _write(tmp_path / "notok", {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, KW)
    with pytest.raises(CheckpointError, match="vocab.json"):
        plateau_jax.load_gpt2(str(tmp_path / "notok"))
    with pytest.raises(ValueError, match="Unsupported dtype"):
        plateau_jax.load_gpt2(tiny_dir, dtype="int8")
    wrong = tmp_path / "wrong"
    _write(wrong, {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"},
           {**KW, "n_inner": 24})
    with pytest.raises(CheckpointError, match="shape"):
        plateau_jax.load_gpt2(str(wrong), require_tokenizer=False)


def test_unsupported_config_lists_every_feature(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", **KW, "scale_attn_by_inverse_layer_idx": True,
        "reorder_and_upcast_attn": True, "add_cross_attention": True, "activation_function": "relu"}))
    with pytest.raises(UnsupportedConfigError) as e:
        plateau_jax.load_gpt2(str(tmp_path))
    for feature in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                    "add_cross_attention", "activation_function='relu'"):
        assert feature in str(e.value)


def test_presets_match_released_sizes():
    large = plateau_jax.GPT2Config.preset("gpt2-large")
    assert (large.n_layer, large.d_model, large.n_head, large.d_mlp) == (36, 1280, 20, 5120)
    xl = plateau_jax.GPT2Config.preset("gpt2-xl")
    assert (xl.n_layer, xl.d_model, xl.d_head) == (48, 1600, 64)
    shapes = plateau_jax.model.params.abstract_params(plateau_jax.GPT2Config.preset("gpt2"))
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 124_439_808  # GPT-2 small's parameter count (tied embeddings)


def test_save_load_roundtrip(tmp_path, tiny_model):
    plateau_jax.save_gpt2(tiny_model, str(tmp_path))
    again = plateau_jax.load_gpt2(str(tmp_path))
    assert _tree_equal(again.params, tiny_model.params)
    assert again.config == tiny_model.config


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoint_reads_exactly(tmp_path, tiny_dir, tiny_model, stored):
    """16-bit safetensors are read bit-exactly and cast to the requested dtype."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    np_dtype = ml_dtypes.bfloat16 if stored == "bfloat16" else np.float16
    flat = load_file(os.path.join(tiny_dir, "model.safetensors"))
    save_file({k: v.astype(np_dtype) for k, v in flat.items()}, tmp_path / "model.safetensors")
    for f in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_dir, f), tmp_path / f)
    m = plateau_jax.load_gpt2(str(tmp_path))
    plateau_jax.save_gpt2(m, str(tmp_path / "f32"))
    got = load_file(str(tmp_path / "f32" / "model.safetensors"))
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], v.astype(np_dtype).astype(np.float32))


@pytest.mark.slow
def test_package_works_with_torch_unimportable(tiny_dir):
    """torch is a test-only reference: with ``import torch`` made to fail, loading (tokenizer
    included) and the forward pass still work."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; import plateau_jax; "
            "m = plateau_jax.load_gpt2(sys.argv[1]); "
            "print(plateau_jax.forward(m, m.to_tokens('The house was big'))[0].shape)")
    out = subprocess.run([sys.executable, "-c", code, tiny_dir], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 4, 400)")
    import pathlib
    import re
    src = pathlib.Path(plateau_jax.__file__).parent
    offenders = [str(p) for p in src.rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+torch\b", p.read_text(), re.M)]
    assert offenders == []


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs") or jax.default_backend() != "cpu",
                    reason="needs Linux's resettable peak RSS and the CPU backend")
def test_loading_keeps_one_copy_of_the_weights_in_host_memory(tmp_path):
    """The stacked buffers are adopted by the CPU device, not copied: the peak RSS while loading
    grows by the params' size plus one checkpoint tensor being read, not by params + the largest
    stacked tensor (here W_in and W_out are each 48% of the params, so one extra copy of a
    stacked tensor would show as a peak growth of about 1.5x; one layer's tensor is 6%)."""
    from plateau_jax.model import loading
    cfg = plateau_jax.ModelConfig.gpt2(n_layer=8, d_model=128, n_head=2, d_mlp=16384,
                                       vocab_size=256, n_positions=16)
    plateau_jax.testing.make_checkpoint(str(tmp_path), cfg)
    source = loading._weight_source(str(tmp_path), allow_pickle=False)
    config = loading.read_config(str(tmp_path))
    before = _rss_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    params = loading.load_params(source, config, "float32", str(tmp_path))
    jax.block_until_ready(params)
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    growth = (_rss_bytes("VmHWM:") - before) / size
    assert growth < 1.25, f"peak RSS grew by {growth:.2f}x the params' size"


# ----------------------------------------------------------------------------- damaged checkpoints

def _copy_without_weights(src, dst):
    """A checkpoint directory like ``src`` (config and tokenizer files) with no weights."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.mark.parametrize("size", [0, 4, 50])
def test_truncated_or_empty_safetensors_names_the_file(tmp_path, tiny_dir, size):
    """A cut-off download (0, 4 or 50 bytes: no header, a partial length, a partial header) is
    refused with the file named, not a bare JSON parser message."""
    d = _copy_without_weights(tiny_dir, tmp_path / "ckpt")
    with open(os.path.join(tiny_dir, "model.safetensors"), "rb") as f:
        (d / "model.safetensors").write_bytes(f.read(size))
    with pytest.raises(CheckpointError) as e:
        plateau_jax.load_model(str(d))
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg and "not a valid safetensors file" in msg, msg
    assert "Download or convert it again" in msg


def test_safetensors_with_its_data_cut_off_names_the_tensor(tmp_path, tiny_dir):
    d = _copy_without_weights(tiny_dir, tmp_path / "ckpt")
    with open(os.path.join(tiny_dir, "model.safetensors"), "rb") as f:
        data = f.read()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"past the end of the \d+-byte file \(truncated"):
        plateau_jax.load_model(str(d))


def test_absurd_header_is_refused_before_anything_is_allocated(tmp_path, tiny_dir):
    """A header claiming a [200000, 200000] float32 tensor (149 GiB) in a tiny file is refused
    from the header alone (the test would run out of memory otherwise)."""
    d = _copy_without_weights(tiny_dir, tmp_path / "ckpt")
    header = json.dumps({"h.0.attn.c_attn.weight": {
        "dtype": "F32", "shape": [200000, 200000], "data_offsets": [0, 4 * 200000 ** 2]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="past the end of the"):
        plateau_jax.load_model(str(d))
    # a header length larger than the file
    (d / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header claims 1000000000000 bytes"):
        plateau_jax.load_model(str(d))


def test_invalid_config_json_names_the_file(tmp_path, tiny_dir):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    (d / "config.json").write_text('{"model_type": "gpt2", "n_layer": 3,')
    with pytest.raises(CheckpointError) as e:
        plateau_jax.load_model(str(d))
    assert str(d / "config.json") in str(e.value) and "not valid JSON" in str(e.value)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        plateau_jax.load_model(str(d))


def test_pickle_with_a_non_tensor_global_gets_a_clean_error(tmp_path):
    """A state dict holding anything but tensors (here a datetime) is refused by the restricted
    unpickler with the file named and the fix (convert to safetensors)."""
    import datetime
    torch.save({"w": torch.ones(2), "when": datetime.date(2020, 1, 1)},
               tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    with pytest.raises(CheckpointError) as e:
        plateau_jax.load_model(str(tmp_path), require_tokenizer=False, allow_pickle=True)
    msg = str(e.value)
    assert str(tmp_path / "pytorch_model.bin") in msg and "convert" in msg, msg


def test_zip_without_data_pkl_gets_a_clean_error(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
        z.writestr("archive/readme.txt", "not a checkpoint")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **KW}))
    with pytest.raises(CheckpointError, match="no data.pkl inside"):
        plateau_jax.load_model(str(tmp_path), require_tokenizer=False, allow_pickle=True)


def test_unreachable_hub_suggests_hf_download(tmp_path):
    """Offline, with a model that is not in the (empty) cache: the message names the cache, the
    files needed and the current CLI (`hf download`, not the removed `huggingface-cli`)."""
    with pytest.raises(CheckpointError) as e:
        plateau_jax.load_model("gpt2-large", cache_dir=str(tmp_path), local_files_only=True,
                               revision="main")
    msg = str(e.value)
    assert "hf download gpt2-large --revision main" in msg and str(tmp_path) in msg, msg
    assert "huggingface-cli" not in msg


def test_nan_weights_are_refused_at_load_time_naming_the_tensor(tmp_path, ref):
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.1.mlp.c_proj.weight"][3, 2] = float("nan")
    _write(tmp_path, state, KW)
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_proj\.weight.*NaN or Inf"):
        plateau_jax.load_model(str(tmp_path), require_tokenizer=False)
    # a value that fits float32 but overflows float16 is named with the dtype and the fix
    state["transformer.h.1.mlp.c_proj.weight"][3, 2] = 1e6
    _write(tmp_path, state, KW)
    with pytest.raises(CheckpointError, match="as float16.*try dtype float32"):
        plateau_jax.load_model(str(tmp_path), require_tokenizer=False, dtype="float16")
