"""Loading GPT-2 checkpoints (HF hub id or local directory) into a :class:`GPT2`, and saving them.

Loading is "abstract init, then fill": the param tree's shapes come from ``jax.eval_shape`` of
the Flax init (nothing allocated), then tensors stream from the safetensors file(s) one at a
time, each checked against its expected shape, cast, and put on the device. Nothing is
returned unless every expected tensor was found, so a failed load leaves nothing half-built.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model.config import GPT2Config
from plateau_jax.model.model import GPT2, abstract_params, resolve_dtype

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILE = "pytorch_model.bin"
TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json",
                "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
# Named models resolved offline: name -> directory (models shipped inside this package).
LOCAL_MODELS: Dict[str, str] = {}
# The model scripts use when none is given.
DEFAULT_MODEL = "tiny-plateau"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match its config."""


def _missing_files_error(where: str, missing, hint: str = "") -> CheckpointError:
    return CheckpointError(
        f"{where} is missing {', '.join(missing)}. A GPT-2 checkpoint directory needs "
        "config.json, model.safetensors (or a sharded index) and the tokenizer files "
        "(vocab.json + merges.txt, or tokenizer.json)." + hint)


def _fetch_from_hub(repo_id: str, *, cache_dir, revision, local_files_only, allow_pickle) -> str:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    patterns = HUB_PATTERNS + ([PICKLE_FILE] if allow_pickle else [])
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
            local_files_only=local_files_only)
    except hf_errors.RepositoryNotFoundError as e:
        raise CheckpointError(
            f"Unknown model {repo_id!r}: it is neither a local directory nor a Hugging Face Hub "
            "repository (try 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local path).") from e
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError,
            hf_errors.HfHubHTTPError) as e:
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        raise CheckpointError(
            f"Could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}) and it is "
            f"not cached under {cache}. Needed files: config.json, model.safetensors, vocab.json, "
            "merges.txt. On a machine with internet run `huggingface-cli download "
            f"{repo_id} config.json model.safetensors vocab.json merges.txt --local-dir DIR` "
            "and pass DIR (a local directory) instead.") from e


def resolve_checkpoint(name_or_path: str, *, cache_dir=None, revision=None,
                       local_files_only: Optional[bool] = None, allow_pickle=False) -> str:
    """Local directory holding the checkpoint: ``name_or_path`` itself, a shipped name, or a
    hub snapshot (fetched once into the HF cache; only config, weights and tokenizer files)."""
    name = os.fspath(name_or_path)
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name]
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise CheckpointError(f"{name!r} is a file; pass the directory that contains it.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.\-/]+", name):
        raise CheckpointError(f"No such model directory: {name!r} (and it is not a valid hub id).")
    if local_files_only is None:
        local_files_only = bool(os.environ.get("HF_HUB_OFFLINE"))
    return _fetch_from_hub(name, cache_dir=cache_dir, revision=revision,
                           local_files_only=local_files_only, allow_pickle=allow_pickle)


def _weight_files(directory: str, allow_pickle: bool) -> Tuple[str, list]:
    """Returns ("safetensors" | "pickle", file paths)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return "safetensors", [single]
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
        if missing:
            raise _missing_files_error(directory, missing)
        return "safetensors", [os.path.join(directory, s) for s in shards]
    pkl = os.path.join(directory, PICKLE_FILE)
    if os.path.exists(pkl):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} has only {PICKLE_FILE}, a pickle file: unpickling can run arbitrary "
                "code. Convert it to safetensors, or pass allow_pickle=True if you trust its source.")
        return "pickle", [pkl]
    raise _missing_files_error(directory, ["model.safetensors"])


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _iter_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Reads one tensor at a time with plain file reads (no mmap), so that host memory holds at
    most one tensor beyond what has already been moved to the device."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "BF16" \
                else np.dtype(_ST_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            arr = np.empty(info["shape"], dtype)
            f.seek(base + start)
            if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != end - start:
                raise CheckpointError(f"{path}: truncated data for tensor {key!r}.")
            yield key, arr


def _iter_tensors(kind: str, files) -> Iterator[Tuple[str, np.ndarray]]:
    if kind == "pickle":
        from plateau_jax.model.pickle_weights import load_torch_state_dict
        yield from load_torch_state_dict(files[0]).items()
        return
    for path in files:
        yield from _iter_safetensors(path)


def _normalise_key(key: str) -> Optional[str]:
    """HF key -> our dotted path, or None for buffers we ignore."""
    for prefix in ("transformer.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return None if _IGNORED.search(key) else key


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flatten(v, path + ".") if isinstance(v, dict) else {path: v})
    return out


def _unflatten(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def load_params(directory: str, config: GPT2Config, dtype="float32", allow_pickle=False):
    """Streams the checkpoint's tensors into a param tree matching ``config`` (see module doc)."""
    dt = resolve_dtype(dtype)
    expected = _flatten(abstract_params(config))
    kind, files = _weight_files(directory, allow_pickle)
    loaded = {}
    for key, arr in _iter_tensors(kind, files):
        name = _normalise_key(key)
        if name is None:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the unembedding is wte
        if name not in expected:
            raise CheckpointError(f"{directory}: unexpected tensor {key!r} for a GPT-2 with this config.")
        if tuple(arr.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {tuple(arr.shape)}, but config.json implies "
                f"{tuple(expected[name].shape)}.")
        loaded[name] = jax.device_put(arr.astype(dt, copy=False))
        del arr
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{directory}: checkpoint lacks tensors {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else "") + ".")
    return _unflatten(loaded)


def apply_center_writing_weights(params, config: GPT2Config):
    """TransformerLens' ``center_writing_weights``: remove the d_model-mean of every weight that
    writes to the residual stream (wte, wpe, attention and MLP output projections and biases).

    LayerNorm outputs and logits are unchanged (LayerNorm removes the mean anyway); residual
    vectors, their norms and angles, and residual Jacobians become those the study reported.
    The unembedding keeps the uncentred ``wte`` (as ``lm_head``), so the returned config is
    untied. Returns (params, config); the input tree is not modified.
    """
    center = lambda a: a - a.mean(axis=-1, keepdims=True)
    new = {k: v for k, v in params.items()}
    if config.tie_word_embeddings:
        new["lm_head"] = {"weight": params["wte"]["weight"]}
    new["wte"] = {"weight": center(params["wte"]["weight"])}
    new["wpe"] = {"weight": center(params["wpe"]["weight"])}
    new["h"] = {}
    for i, blk in params["h"].items():
        blk = dict(blk)
        for part in ("attn", "mlp"):
            sub = dict(blk[part])
            sub["c_proj"] = {k: center(v) for k, v in blk[part]["c_proj"].items()}
            blk[part] = sub
        new["h"][i] = blk
    return new, config.__class__(**{**config.__dict__, "tie_word_embeddings": False})


def _warn_if_identity_drops_affine(params, config: GPT2Config, tol: float = 1e-3) -> float:
    """With eps huge, LayerNorm is ~ (x - mean) * weight / sqrt(eps) + bias. Identity mode (the
    study's choice) drops that affine part; warn when it is not ~(1, 0). Returns the deviation."""
    lns = [params["ln_f"]] + [blk[k] for blk in params["h"].values() for k in ("ln_1", "ln_2")]
    scale = 1.0 / np.sqrt(config.layer_norm_epsilon)
    dev = max(max(float(np.abs(np.asarray(ln["weight"], np.float64) * scale - 1).max()),
                  float(np.abs(np.asarray(ln["bias"], np.float64)).max())) for ln in lns)
    if dev > tol:
        log.warning(
            "ln_mode='identity' drops LayerNorm affine parts that differ from the identity by up "
            "to %.3g (weight/sqrt(eps) vs 1, bias vs 0). The study replaced LayerNorms by the "
            "identity; pass ln_mode='normal' to run the checkpoint's exact function instead.", dev)
    return dev


def _load_tokenizer(directory: str, require: bool):
    present = [s for s in TOKENIZER_FILE_SETS
               if all(os.path.exists(os.path.join(directory, f)) for f in s)]
    if not present:
        if require:
            raise _missing_files_error(directory, ["vocab.json", "merges.txt"],
                                       " Pass require_tokenizer=False to load weights only.")
        return None
    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(directory)


def load_gpt2(name_or_path: str, *, dtype="float32", ln_mode: str = "auto",
              center_writing_weights: bool = False, allow_pickle: bool = False,
              require_tokenizer: bool = True, cache_dir: Optional[str] = None,
              revision: Optional[str] = None, local_files_only: Optional[bool] = None) -> GPT2:
    """Loads a GPT-2 checkpoint.

    Args:
      name_or_path: a local directory, a hub id ("gpt2-large", "org/name"), or a shipped name.
      dtype: "float32" (default), "bfloat16" or "float16" for the params and compute.
      ln_mode: "auto" (identity for LayerNorm-free checkpoints, detected by a huge
        ``layer_norm_epsilon``), "normal" or "identity".
      center_writing_weights: apply TransformerLens' centring (the study's numbers carry it).
      allow_pickle: accept a checkpoint with only ``pytorch_model.bin`` (unpickling can run code).
      require_tokenizer: raise if tokenizer files are missing (else ``.tokenizer`` is None).
      cache_dir, revision, local_files_only: passed to the hub download.

    Returns:
      a :class:`GPT2` with ``.params``, ``.config``, ``.tokenizer``.
    """
    dt = resolve_dtype(dtype)
    directory = resolve_checkpoint(name_or_path, cache_dir=cache_dir, revision=revision,
                                   local_files_only=local_files_only, allow_pickle=allow_pickle)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise _missing_files_error(directory, ["config.json"])
    if ln_mode not in ("auto", "normal", "identity"):
        raise ValueError(f"ln_mode={ln_mode!r}: expected 'auto', 'normal' or 'identity'.")
    config = GPT2Config.from_json_file(config_path, ln_mode=ln_mode)
    _weight_files(directory, allow_pickle)  # fail on missing weights before the tokenizer loads
    tokenizer = _load_tokenizer(directory, require_tokenizer)
    params = load_params(directory, config, dt, allow_pickle)
    if config.ln_mode == "identity":
        _warn_if_identity_drops_affine(params, config)
    if center_writing_weights:
        if config.ln_mode == "identity":
            log.warning("center_writing_weights skipped: without LayerNorm, centring would change "
                        "the outputs (TransformerLens skips it too).")
        else:
            params, config = apply_center_writing_weights(params, config)
    return GPT2(params=params, config=config, tokenizer=tokenizer, name=os.fspath(name_or_path))


def save_gpt2(model: GPT2, directory: str) -> str:
    """Writes ``config.json`` + ``model.safetensors`` (HF key names, ``transformer.`` prefix) and
    the tokenizer files into ``directory``, each file atomically; returns the directory."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    flat = _flatten(jax.device_get(model.params))
    tensors = {}
    for k, v in flat.items():
        arr = np.asarray(v)
        if arr.dtype == jnp.bfloat16:
            arr = arr.astype(np.float32)
        tensors[k if k.startswith("lm_head") else "transformer." + k] = np.ascontiguousarray(arr)
    tmp = os.path.join(directory, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    tmp = os.path.join(directory, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    os.replace(tmp, os.path.join(directory, "config.json"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return directory
