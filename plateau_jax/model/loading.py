"""Loading checkpoints (hub id, local directory or shipped name) into a :class:`Model`, and saving.

Loading is "abstract shapes, check, then fill": the expected tensors come from the config (the
family's :func:`tensor_rules`), every file header is checked against them before any data is
read (missing, unexpected and misshapen tensors and truncated files are refused with the file
named), then tensors stream one at a time into layer-stacked buffers, each buffer checked for
NaN/Inf and moved to the device as soon as it is full. Nothing is returned unless every tensor
was found, so a failed load leaves nothing half-built.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from plateau_jax.model import families
from plateau_jax.model.config import ModelConfig, UnsupportedConfigError
from plateau_jax.model.core import check_precision
from plateau_jax.model.model import Model, resolve_dtype
from plateau_jax.model.tensor_files import (PickleSource, SafetensorsSource, TensorFileError,
                                            TensorSource)

log = logging.getLogger(__name__)

PICKLE_FILE = "pytorch_model.bin"
TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json",
                "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# Named models resolved offline: name -> directory (models shipped inside this package).
LOCAL_MODELS: Dict[str, str] = {}
# The model scripts use when none is given.
DEFAULT_MODEL = "tiny-plateau"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match its config."""


def _missing_files_error(where: str, missing, hint: str = "") -> CheckpointError:
    return CheckpointError(
        f"{where} is missing {', '.join(missing)}. A checkpoint directory needs config.json, "
        "model.safetensors (or a sharded index) and the tokenizer files (vocab.json + merges.txt, "
        "or tokenizer.json)." + hint)


# ----------------------------------------------------------------------------- where

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
    except hf_errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face "
                              "Hub (a branch, tag or commit, e.g. 'main').") from e
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError,
            hf_errors.HfHubHTTPError) as e:
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        rev = f" --revision {revision}" if revision else ""
        raise CheckpointError(
            f"Could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}) and it is "
            f"not cached under {cache}. Needed files: config.json, model.safetensors and the "
            f"tokenizer files. On a machine with internet run `hf download {repo_id}{rev} "
            "--include 'config.json' '*.safetensors' '*.json' 'merges.txt' --local-dir DIR` "
            "and pass DIR (a local directory) instead.") from e


def resolve_checkpoint(name_or_path: str, *, cache_dir=None, revision=None,
                       local_files_only: Optional[bool] = None, allow_pickle=False) -> str:
    """Local directory holding the checkpoint: ``name_or_path`` itself (``~`` expanded), a
    shipped name, or a hub snapshot (fetched once into the HF cache; only config, weights and
    tokenizer files)."""
    name = os.fspath(name_or_path)
    revision = revision or None  # "" (an empty --revision flag) means the default branch
    if name in LOCAL_MODELS and revision is None:
        return LOCAL_MODELS[name]
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{name!r} is a file; pass the directory that contains it.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.\-/]+", name):
        raise CheckpointError(f"No such model directory: {name!r} (and it is not a valid hub id).")
    if local_files_only is None:
        local_files_only = bool(os.environ.get("HF_HUB_OFFLINE"))
    return _fetch_from_hub(name, cache_dir=cache_dir, revision=revision,
                           local_files_only=local_files_only, allow_pickle=allow_pickle)


def read_config(directory: str, ln_mode: str = "auto") -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory's ``config.json``."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise _missing_files_error(directory, ["config.json"])
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download or write it again.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object; got {type(raw).__name__}.")
    try:
        return ModelConfig.from_hf_dict(raw, ln_mode=ln_mode)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _weight_source(directory: str, allow_pickle: bool) -> TensorSource:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    try:
        if os.path.exists(single):
            return SafetensorsSource([single])
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index (a JSON object with a "
                                      f"'weight_map'): {e}.") from None
            missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
            if missing:
                raise _missing_files_error(directory, missing)
            return SafetensorsSource([os.path.join(directory, s) for s in shards])
        pkl = os.path.join(directory, PICKLE_FILE)
        if os.path.exists(pkl):
            if not allow_pickle:
                raise CheckpointError(
                    f"{directory} has only {PICKLE_FILE}, a pickle file: unpickling can run "
                    "arbitrary code. Convert it to safetensors, or pass allow_pickle=True "
                    "(--allow_pickle) if you trust its source.")
            return PickleSource(pkl)
    except (TensorFileError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(str(e)) from None
    raise _missing_files_error(directory, ["model.safetensors"])


# ----------------------------------------------------------------------------- params

def _plan(source: TensorSource, cfg: ModelConfig, directory: str):
    """``[(rule, [source names, one per layer or one])]``, after checking that the checkpoint
    holds exactly the expected tensors with the expected shapes."""
    fam = families.get(cfg.family)
    rules = fam.tensor_rules(cfg)
    wanted = {}
    for r in rules:
        for i in (range(cfg.n_layer) if r.per_layer else [None]):
            wanted[r.key(i)] = r
    found, unexpected = {}, []
    for name in source.shapes:
        key = next((name[len(p):] for p in fam.PREFIXES if name.startswith(p)), name)
        key = fam.ALIASES.get(key, key)
        if fam.IGNORED.search(key) or (key == fam.TIED_KEY and cfg.tie_embeddings):
            continue
        if key in wanted and key not in found:
            found[key] = name
        else:
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensors {sorted(unexpected)[:8]} for a "
                              f"{cfg.family} model with this config.json (wrong config?).")
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CheckpointError(f"{directory}: checkpoint lacks tensors {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else "") + ".")
    for key, name in found.items():
        if tuple(source.shapes[name]) != wanted[key].shape:
            raise CheckpointError(
                f"{directory}: tensor {name!r} has shape {tuple(source.shapes[name])}, but "
                f"config.json implies {wanted[key].shape}.")
    return [(r, [found[r.key(i)] for i in (range(cfg.n_layer) if r.per_layer else [None])])
            for r in rules]


def _set(tree: dict, path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _finite(buf: np.ndarray, names, dt, directory: str) -> None:
    ok = np.array([np.isfinite(row).all()  # bf16/f16 checked as stored, no float32 copy
                   for row in buf.reshape(len(names), -1)])
    if ok.all():
        return
    bad = [n for n, good in zip(names, ok) if not good]
    raise CheckpointError(
        f"{directory}: tensor(s) {bad[:4]} hold NaN or Inf after loading as {np.dtype(dt).name} "
        "(a damaged checkpoint, or values too large for this dtype: try dtype float32).")


def stored_dtype(source: TensorSource, names):
    """The float dtype a checkpoint stores the weights ``names`` in (``dtype="auto"``; ignored
    buffers do not count): their one float dtype, or the widest of several (float64 reads as
    float32)."""
    order = [np.dtype(jnp.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32)]
    dtypes = [np.dtype(source.dtypes[n]) for n in names]
    found = {dt for dt in dtypes if np.issubdtype(dt, np.floating) or dt == order[1]}
    if not found:
        raise CheckpointError("dtype='auto': the checkpoint holds no floating-point tensors.")
    if len(found) > 1:
        log.info("dtype='auto': the checkpoint mixes %s; loading as the widest.",
                 sorted(d.name for d in found))
    widest = max(found, key=lambda d: (d.itemsize, order.index(d) if d in order else 3))
    return resolve_dtype("float32" if widest.itemsize > 4 else widest.name)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary. XLA's CPU client adopts such
    a buffer in ``device_put`` instead of copying it, so on CPU a loaded tensor exists once (a
    numpy default allocation is 16-byte aligned and gets copied: the largest stacked tensor,
    GPT-2 Large's W_in at 0.94 GB, then briefly existed twice)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def load_params(source: TensorSource, cfg: ModelConfig, dtype, directory: str = "checkpoint"):
    """Streams ``source``'s tensors into the canonical, layer-stacked param tree on the device.

    Host memory beyond the params: one stacked tensor being filled (none on CPU, where the
    device adopts the filled buffer) and one checkpoint tensor being read."""
    dt = np.dtype(resolve_dtype(dtype))
    params: dict = {}
    for r, names in _plan(source, cfg, directory):
        bufs: Dict[tuple, np.ndarray] = {}
        for i, name in enumerate(names):
            for path, part in r.split(source.read(name)).items():
                if path not in bufs:
                    bufs[path] = _aligned_empty((len(names),) + part.shape, dt)
                with np.errstate(over="ignore"):  # overflow is reported by _finite, by name
                    bufs[path][i] = part
        for path, buf in bufs.items():
            _finite(buf, names, dt, directory)
            _set(params, path, jax.device_put(buf if r.per_layer else buf[0]))
        del bufs
    return params


_WRITING_WEIGHTS = (("embed", "W_E"), ("pos_embed", "W_pos"),
                    ("blocks", "attn", "W_O"), ("blocks", "attn", "b_O"),
                    ("blocks", "mlp", "W_out"), ("blocks", "mlp", "b_out"))


def apply_center_writing_weights(params, config: ModelConfig):
    """TransformerLens' ``center_writing_weights``: remove the d_model-mean of every weight that
    writes to the residual stream (W_E, W_pos, W_O, b_O, W_out, b_out).

    LayerNorm outputs and logits are unchanged (LayerNorm removes the mean anyway); residual
    vectors, their norms and angles, and residual Jacobians become those the study reported.
    The unembedding keeps the uncentred ``W_E`` (as ``unembed/W_U``), so the returned config is
    untied. Returns (params, config); the input tree is not modified.
    """
    new = jax.tree.map(lambda a: a, params)  # the same leaves in new dicts
    return new, _center_writing_weights_in_place(new, config)


def _center_writing_weights_in_place(params: dict, config: ModelConfig) -> ModelConfig:
    """:func:`apply_center_writing_weights` on a tree the caller owns: each weight is replaced as
    soon as its centred copy exists, so while loading at most one weight (GPT-2 Large's W_out,
    0.94 GB) exists twice. Returns the untied config."""
    if config.tie_embeddings:
        params["unembed"] = {"W_U": params["embed"]["W_E"].T}
    for *parents, name in _WRITING_WEIGHTS:
        node = params
        for key in parents:
            node = node.get(key, {})
        if name in node:
            node[name] = node[name] - node[name].mean(axis=-1, keepdims=True)
    return config.replace(tie_embeddings=False)


def _warn_if_identity_drops_affine(params, config: ModelConfig, tol: float = 1e-3) -> float:
    """With eps huge, LayerNorm is ~ (x - mean) * weight / sqrt(eps) + bias. Identity mode (the
    study's choice) drops that affine part; warn when it is not ~(1, 0). Returns the deviation."""
    norms = [params["ln_final"], params["blocks"]["ln1"], params["blocks"]["ln2"]]
    scale = 1.0 / np.sqrt(config.norm_eps)
    dev = max(max(float(np.abs(np.asarray(n["w"], np.float64) * scale - 1).max()),
                  float(np.abs(np.asarray(n["b"], np.float64)).max()) if "b" in n else 0.0)
              for n in norms)
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
        try:
            return AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{directory}: the tokenizer files cannot be read ({e}).") from None


def load_model(name_or_path: str, *, dtype="float32", ln_mode: str = "auto",
               center_writing_weights: bool = False, allow_pickle: bool = False,
               require_tokenizer: bool = True, matmul_precision: str = "highest",
               cache_dir: Optional[str] = None, revision: Optional[str] = None,
               local_files_only: Optional[bool] = None) -> Model:
    """Loads a checkpoint of any supported family: GPT-2, GPT-NeoX (Pythia) or Llama-style
    (Llama, Qwen2, Mistral), dispatched on ``config.json``'s ``model_type`` (docs/families.md).

    Args:
      name_or_path: a local directory, a hub id ("gpt2-large", "org/name"), or a shipped name.
      dtype: "float32" (default), "bfloat16" or "float16" for the params and compute, or
        "auto": the checkpoint's stored float dtype (bf16 weights load as bf16, read as they
        are, with no float32 copy).
      ln_mode: "auto" (identity for LayerNorm-free checkpoints, detected by a huge
        ``layer_norm_epsilon``), "normal" or "identity".
      center_writing_weights: apply TransformerLens' centring (the study's numbers carry it).
      allow_pickle: accept a checkpoint with only ``pytorch_model.bin`` (unpickling can run code).
      require_tokenizer: raise if tokenizer files are missing (else ``.tokenizer`` is None).
      matmul_precision: "highest" (exact float32 everywhere) or a faster setting by name.
      cache_dir, revision, local_files_only: passed to the hub download; ``revision`` is a
        branch, tag or commit (e.g. Pythia's training checkpoints "step0" ... "step143000").

    Returns:
      a :class:`Model` with ``.params``, ``.config``, ``.tokenizer``.
    """
    dt = None if isinstance(dtype, str) and dtype == "auto" else resolve_dtype(dtype)
    check_precision(matmul_precision)
    if ln_mode not in ("auto", "normal", "identity"):
        raise ValueError(f"ln_mode={ln_mode!r}: expected 'auto', 'normal' or 'identity'.")
    directory = resolve_checkpoint(name_or_path, cache_dir=cache_dir, revision=revision,
                                   local_files_only=local_files_only, allow_pickle=allow_pickle)
    config = read_config(directory, ln_mode)
    source = _weight_source(directory, allow_pickle)
    plan = _plan(source, config, directory)  # refuse a wrong checkpoint before the tokenizer loads
    dt = stored_dtype(source, [n for _, names in plan for n in names]) if dt is None else dt
    tokenizer = _load_tokenizer(directory, require_tokenizer)
    try:
        params = load_params(source, config, dt, directory)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None
    if config.ln_mode == "identity":
        _warn_if_identity_drops_affine(params, config)
    if center_writing_weights:
        if config.ln_mode == "identity" or config.norm != "layernorm":
            log.warning("center_writing_weights skipped: without LayerNorm (identity norms or "
                        "RMSNorm, which does not remove the mean), centring would change the "
                        "outputs (TransformerLens skips it too).")
        else:
            config = _center_writing_weights_in_place(params, config)
    return Model(params=params, config=config, tokenizer=tokenizer, name=os.fspath(name_or_path),
                 matmul_precision=matmul_precision)


def save_model(model: Model, directory: str) -> str:
    """Writes ``config.json`` + ``model.safetensors`` (the family's HF names) and the tokenizer
    files into ``directory``, each file atomically; returns the directory."""
    from safetensors.numpy import save_file

    cfg = model.config
    fam = families.get(cfg.family)
    os.makedirs(directory, exist_ok=True)
    host = jax.device_get(model.params)

    def getter(i):
        def get(path):
            node = host
            for p in path:
                node = node[p]
            arr = np.asarray(node if i is None else node[i])
            return arr.astype(np.float32) if arr.dtype == jnp.bfloat16 else arr
        return get

    tensors = {}
    for r in fam.tensor_rules(cfg):
        for i in (range(cfg.n_layer) if r.per_layer else [None]):
            key = r.key(i)
            tensors[fam.save_prefix(key) + key] = np.ascontiguousarray(r.join(getter(i)))
    tmp = os.path.join(directory, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    tmp = os.path.join(directory, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    os.replace(tmp, os.path.join(directory, "config.json"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return directory


# The names the first release used.
load_gpt2 = load_model
save_gpt2 = save_model
