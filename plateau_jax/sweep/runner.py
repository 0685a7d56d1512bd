"""A resumable sweep on disk: manifest, one shard per (interpolation layer, batch), errors.

Layout of ``output_dir``::

    manifest.json          exact configuration + its hash; a rerun with another config is refused
    pairs.jsonl            the valid pairs in sweep order (index, source line, text, token ids)
    errors.jsonl           rejected rows and failed pairs: {"line", "reason", "row"}
    shards/L{L:02d}_b{i:06d}.npz   per-pair statistics and small curves of batch i at layer L

Each shard is written with an atomic rename, so one that exists is complete; a restarted run
with the same command skips those and computes the rest, ending with the same files as an
uninterrupted run. The configuration is checked against ``manifest.json`` before anything is
written (:func:`check_output`); a different one is refused (:class:`ConfigMismatchError`) unless
``overwrite``, which deletes the old sweep's files first (:func:`clear_sweep`). Under
``jax.distributed`` every process runs the same loop; process 0 decides what is left to do and
writes the files (use a directory process 0 can write).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from plateau_jax import files
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.model import GPT2
from plateau_jax.plateaus import paths as paths_lib
from plateau_jax.plateaus.interpolation import dtype_hint
from plateau_jax.plateaus.prompts import PromptPair
from plateau_jax.sweep import stats as stats_lib
from plateau_jax.sweep.engine import SweepEngine, SweepSpec
from plateau_jax.sweep.inputs import RowError

FORMAT_VERSION = 2  # 2: S on r and on d, fixed-width refined sharpness, endpoint angle
MANIFEST = "manifest.json"
# Everything a sweep writes into its output directory (clear_sweep removes these).
SWEEP_FILES = (MANIFEST, "pairs.jsonl", "errors.jsonl", "shards", "input_pairs.jsonl",
               "generator_skipped.jsonl", "report")
# Configuration keys known before the model loads (checked first by the script).
EARLY_KEYS = ("format", "spec", "batch_size", "plateau_tol", "plateau_width", "input")


class ConfigMismatchError(files.OutputConflictError, RuntimeError):
    """The output directory holds a sweep with a different configuration."""


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(config: dict) -> str:
    """Hash of everything that determines results: the model's name/path is left out (the
    weights' fingerprint is in), so moving a checkpoint does not block resuming."""
    model = {k: v for k, v in config.get("model", {}).items() if k != "name"}
    return canonical_hash({**config, "model": model})


def model_fingerprint(model: GPT2) -> str:
    """Hash of the config and of every parameter's bytes (exact; one pass over the weights)."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True, default=str).encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(model.params),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def pairs_fingerprint(pairs: Sequence[Tuple[int, PromptPair]]) -> str:
    h = hashlib.sha256()
    for line, p in pairs:
        h.update(json.dumps([line, p.context_ids.tolist(), p.token_a, p.token_b]).encode())
    return h.hexdigest()


def target_labels(n_layer: int) -> List[str]:
    """Target axis of every stored statistic: layers 0..n_layer-1, then the logits."""
    return [str(l) for l in range(n_layer)] + ["logits"]


def shard_path(output_dir: str, layer: int, batch: int) -> str:
    return os.path.join(output_dir, "shards", f"L{layer:02d}_b{batch:06d}.npz")


def context_length(pairs, n_positions: Optional[int] = None) -> int:
    """Padded context length: the longest context, rounded up to a multiple of 8 (fewer compiled
    shapes), but never past the model's ``n_positions``."""
    longest = max(len(p.context_ids) for _, p in pairs)
    rounded = int(-(-longest // 8) * 8)
    return rounded if n_positions is None else min(rounded, int(n_positions))


def early_config(spec: SweepSpec, batch_size: int, plateau_tol: float, plateau_width: float,
                 extra: Optional[dict] = None) -> dict:
    """The part of :func:`sweep_config` known without the model and the pairs."""
    return {
        "format": FORMAT_VERSION,
        "spec": {"layers": list(spec.layers), "n_steps": spec.n_steps, "path": spec.path,
                 "component": spec.component, "tol": spec.tol,
                 "sharpness_width": spec.sharpness_width, "entry_site": "resid_post"},
        "batch_size": int(batch_size),
        "plateau_tol": float(plateau_tol),
        "plateau_width": float(plateau_width),
        **(extra or {}),
    }


def sweep_config(model: GPT2, pairs, spec: SweepSpec, batch_size: int, plateau_tol: float,
                 plateau_width: float, extra: Optional[dict] = None) -> dict:
    """Everything that determines the sweep's results (hashed into the manifest)."""
    return {
        **early_config(spec, batch_size, plateau_tol, plateau_width, extra),
        "context_length": context_length(pairs, model.config.n_positions) if pairs else 0,
        "model": {"name": model.name, "config": model.config.__dict__,
                  "fingerprint": model_fingerprint(model), "dtype": str(model.dtype)},
        "pairs": {"n": len(pairs), "fingerprint": pairs_fingerprint(pairs)},
    }


def _diff_keys(a, b, prefix=""):
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, prefix + k + ".")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} (on disk) vs {vb!r} (now)")
    return out


def read_manifest(output_dir: str) -> Optional[dict]:
    """The manifest of ``output_dir``, or None if there is none; an unreadable one is an error."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(f"{path} cannot be read ({e}); pass --overwrite to start a new "
                                  "sweep there, or use another --output_dir.") from None


def check_output(output_dir: str, config: dict, keys: Optional[Sequence[str]] = None) -> Optional[str]:
    """Compares ``config`` (only ``keys`` of it, if given) with the sweep in ``output_dir``
    without writing anything. Returns the stored config hash (None if there is no sweep);
    raises :class:`ConfigMismatchError` naming the differing settings."""
    old = read_manifest(output_dir)
    if old is None:
        return None
    stored = json.loads(json.dumps(old.get("config", {}), default=str))
    now = json.loads(json.dumps(config, default=str))
    if keys is not None:
        stored = {k: stored.get(k) for k in keys}
        now = {k: now.get(k) for k in keys}
    elif old.get("config_hash") == config_hash(config):
        return old["config_hash"]
    diffs = [d for d in _diff_keys(stored, now) if not d.startswith("model.name:")]
    if keys is None and not diffs:  # same settings, other hash: another format version
        diffs = [f"config hash {old.get('config_hash')} (on disk) vs {config_hash(config)} (now)"]
    if diffs:
        raise ConfigMismatchError(
            f"{output_dir!r} holds a sweep with a different configuration; refusing to mix "
            f"results. Differences: {'; '.join(diffs[:10])}. Use a new --output_dir, the "
            "original settings, or --overwrite to delete that sweep and start this one.")
    return old.get("config_hash")


def clear_sweep(output_dir: str) -> None:
    """Deletes a sweep's files from ``output_dir`` (manifest first, so a sweep killed halfway
    through is never mistaken for the old one; other files in the directory are kept)."""
    for name in SWEEP_FILES:
        path = os.path.join(output_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    for entry in os.listdir(output_dir):  # the report's version directories
        if entry.startswith(".report-"):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)


def open_output(output_dir: str, config: dict, overwrite: bool = False,
                rejected_rows: int = 0) -> str:
    """Creates or checks ``manifest.json``; returns the config hash.

    Raises :class:`ConfigMismatchError` (naming the differing settings) if the directory holds
    a sweep with another configuration, unless ``overwrite`` (which deletes that sweep first).
    """
    files.prepare_output_dir(output_dir)
    h = config_hash(config)
    try:
        if check_output(output_dir, config) is not None:
            os.makedirs(os.path.join(output_dir, "shards"), exist_ok=True)
            return h
    except ConfigMismatchError:
        if not overwrite:
            raise
        if jax.process_index() == 0:
            logging.warning("--overwrite: deleting the sweep in %s", output_dir)
            clear_sweep(output_dir)
    if jax.process_index() == 0:
        os.makedirs(os.path.join(output_dir, "shards"), exist_ok=True)
        files.atomic_write_json(os.path.join(output_dir, MANIFEST),
                                {"config": config, "config_hash": h,
                                 "rejected_rows": int(rejected_rows), **files.run_metadata()})
    return h


def _shard_ok(path: str, h: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as z:
            return str(z["config_hash"]) == h
    except Exception:  # unreadable: recompute (atomic writes make this rare)
        return False


def _expand(stat: np.ndarray, layer: int, n_layer: int) -> np.ndarray:
    """``[B, n_layer + 1]`` (every layer, then the logits) with NaN for the layers at or before
    the interpolation layer (never downstream of it)."""
    out = np.array(stat, np.float64)
    out[:, :sites_lib.first_layer_after(layer, "resid_post")] = np.nan
    return out


def _run_batch(engine: SweepEngine, layer, ids, lengths, ta, tb, pad_to):
    """Engine call; if the batch fails, pairs run one by one and failures are returned."""
    try:
        return engine.run(layer, ids, lengths, ta, tb, pad_to=pad_to), {}
    except Exception as e:  # a bad pair must not stop the sweep
        logging.warning("batch failed (%s); retrying its pairs one at a time", e)
    outs, failed = [], {}
    for i in range(len(ids)):
        try:
            outs.append(engine.run(layer, ids[i:i + 1], lengths[i:i + 1], ta[i:i + 1], tb[i:i + 1]))
        except Exception as e:
            failed[i] = f"{type(e).__name__}: {e}"
            outs.append(None)
    ref = next((o for o in outs if o is not None), None)
    if ref is None:
        raise RuntimeError("every pair of the batch failed: " + "; ".join(failed.values()))
    outs = [o if o is not None else {k: np.full_like(v, np.nan if v.dtype.kind == "f" else 0)
                                     for k, v in ref.items()} for o in outs]
    return {k: np.concatenate([o[k] for o in outs]) for k in ref}, failed


def failure_reason(spec: SweepSpec, layer: int, angle: float, dtype) -> str:
    """Why a pair's values are not finite: slerp's antiparallel refusal, or the dtype/weights."""
    if spec.path == "slerp" and angle > math.pi - paths_lib.ANTIPARALLEL_TOL:
        return (f"endpoints at layer {layer} are {math.degrees(angle):.4f} degrees apart, within "
                f"{paths_lib.ANTIPARALLEL_TOL:g} rad "
                f"({math.degrees(paths_lib.ANTIPARALLEL_TOL):.3g} degrees) of antiparallel, "
                "where slerp is undefined; use --path=linear")
    return f"non-finite values interpolating at layer {layer}{dtype_hint(dtype)}"


def run_sweep(model: GPT2, pairs: Sequence[Tuple[int, PromptPair]], spec: SweepSpec,
              output_dir: str, *, batch_size: int = 64, plateau_tol: float = 0.05,
              plateau_width: float = 0.5, input_errors: Sequence[RowError] = (),
              extra_config: Optional[dict] = None, engine: Optional[SweepEngine] = None,
              show_progress: bool = True, overwrite: bool = False,
              before_write=None) -> dict:
    """Runs (or resumes) a sweep into ``output_dir``; returns a small summary dict.

    Nothing is written before the configuration has been checked against the directory's
    manifest; ``before_write()`` (e.g. writing generated input files) runs right after that
    check, on process 0."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1.")
    pairs = list(pairs)
    for L in spec.layers:  # before anything is written
        sites_lib.check_layer(L, model.config, what="interpolation layer")
    config = sweep_config(model, pairs, spec, batch_size, plateau_tol, plateau_width, extra_config)
    h = open_output(output_dir, config, overwrite, rejected_rows=len(input_errors))
    n_layer = model.config.n_layer
    primary = jax.process_index() == 0
    if primary and before_write is not None:
        before_write()
    if primary:
        files.atomic_write_bytes(os.path.join(output_dir, "pairs.jsonl"), "".join(
            json.dumps({"index": i, "line": line, "context": p.context, "ending_a": p.ending_a,
                        "ending_b": p.ending_b, "context_ids": p.context_ids.tolist(),
                        "token_a": p.token_a, "token_b": p.token_b}) + "\n"
            for i, (line, p) in enumerate(pairs)).encode())
    n_batches = -(-len(pairs) // batch_size) if pairs else 0
    units = [(L, i) for i in range(n_batches) for L in spec.layers]
    todo = np.array([not _shard_ok(shard_path(output_dir, L, i), h) for L, i in units], bool)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo)).astype(bool)
    T = config["context_length"]
    size = lambda i: min(batch_size, len(pairs) - i * batch_size)
    done_pairs = sum(size(i) for (L, i), t in zip(units, todo) if not t)
    total = len(pairs) * len(spec.layers)
    if todo.any() and engine is None:
        engine = SweepEngine(model, spec)
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"sweep ({len(spec.layers)} layer(s))", total=total, initial=done_pairs,
               unit="pair", dynamic_ncols=True, smoothing=0.1,
               disable=bool(os.environ.get("PLATEAU_JAX_NO_PROGRESS")) or not (show_progress
                                                                            and primary))
    t0 = time.time()
    computed = 0
    for (L, i), need in zip(units, todo):
        if not need:
            continue
        chunk = pairs[i * batch_size:(i + 1) * batch_size]
        ids = np.zeros((len(chunk), T), np.int32)
        for j, (_, p) in enumerate(chunk):
            ids[j, :len(p.context_ids)] = p.context_ids
        lengths = np.array([len(p.context_ids) for _, p in chunk], np.int32)
        ta = np.array([p.token_a for _, p in chunk], np.int32)
        tb = np.array([p.token_b for _, p in chunk], np.int32)
        curves, failed = _run_batch(engine, L, ids, lengths, ta, tb, batch_size)
        st = stats_lib.pair_stats(curves, spec.alpha, plateau_tol, plateau_width)
        ok = curves["finite"].astype(bool) & np.array([j not in failed for j in range(len(chunk))])
        reasons = [failed[j] if j in failed else "" if ok[j] else
                   failure_reason(spec, L, float(curves["angle"][j]), model.dtype)
                   for j in range(len(chunk))]
        if primary:
            arrays = {"config_hash": np.array(h), "layer": np.array(L), "batch": np.array(i),
                      "pair_index": np.arange(i * batch_size, i * batch_size + len(chunk)),
                      "line": np.array([line for line, _ in chunk]), "ok": ok,
                      "reason": np.array(reasons, dtype=str)}
            arrays.update({f"stat_{k}": _expand(v, L, n_layer) for k, v in st.items()})
            arrays.update({f"curve_{k}": v for k, v in curves.items()})
            files.atomic_save_npz(shard_path(output_dir, L, i), **arrays)
        computed += len(chunk)
        bar.update(len(chunk))
        files.fault_point("compute")
    bar.close()
    dt = time.time() - t0
    if primary:
        write_errors(output_dir, input_errors, spec)
    return {"n_pairs": len(pairs), "n_batches": n_batches, "computed_pairs": computed,
            "seconds": dt, "pairs_per_s": computed / dt if dt > 0 and computed else None,
            "config_hash": h}


def write_errors(output_dir: str, input_errors: Sequence[RowError], spec: SweepSpec) -> str:
    """``errors.jsonl``: rejected input rows, then pairs that failed in the sweep (from shards)."""
    lines = [json.dumps(e.as_json()) for e in sorted(input_errors, key=lambda e: e.line)]
    pairs_by_index = {}
    shard_dir = os.path.join(output_dir, "shards")
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".npz"):
            continue
        with np.load(os.path.join(shard_dir, name)) as z:
            for idx, line, ok, why in zip(z["pair_index"], z["line"], z["ok"], z["reason"]):
                if not ok:
                    pairs_by_index.setdefault(int(idx), (int(line), []))[1].append(str(why))
    for idx in sorted(pairs_by_index):
        line, why = pairs_by_index[idx]
        lines.append(json.dumps({"line": line, "reason": "; ".join(why), "row": f"pair {idx}"}))
    path = os.path.join(output_dir, "errors.jsonl")
    files.atomic_write_bytes(path, "".join(l + "\n" for l in lines).encode())
    return path
