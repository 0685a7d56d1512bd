"""Reference activations at a residual site: collection, float64 mean/covariance, typical distance.

A *reference set* is the activations of many prompts at one site (``blocks.{layer}.hook_{site}``,
site one of ``resid_pre``, ``resid_mid``, ``resid_post``), at the last position of each prompt
or at every position after the first (GPT-2's first position is an outlier of huge norm, so it
is left out by default). It gives the direction baselines what they need:

* ``mean`` ``[d]`` and ``cov`` ``[d, d]`` (unbiased, divisor ``n - 1``), accumulated in float64
  batch by batch (Chan et al.'s pairwise update: exact to float64 rounding, no catastrophic
  cancellation from a large mean);
* ``typical_distance`` ``D``: the median Euclidean distance between two different reference
  activations (over every pair of a seeded sample of at most ``max_pairs_sample`` activations).
  Every step length of :mod:`plateau_jax.plateaus.directions` is in units of ``D``.

Collection is batched and sharded like the sweep (a 1-D device mesh, ``shard_map`` over the
batch; one compiled program for every layer and site, which are runtime values) and streams the
activations to disk (an ``.npy`` written row block by row block, renamed into place when complete).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from plateau_jax import files
from plateau_jax.model import core
from plateau_jax.model import sites as sites_lib
from plateau_jax.model.model import Model
from plateau_jax.sharding import AXIS, make_mesh

POSITIONS = ("last", "all")


class SingularCovarianceError(ValueError):
    """The reference covariance is singular: no Gaussian with it has a density to sample from."""


# ----------------------------------------------------------------------------- prompts

def read_prompts(path: str) -> List[str]:
    """The non-empty lines of a UTF-8 text file (surrounding whitespace stripped), one prompt each."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; pass a text file with one "
                                "prompt per line.")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def tokenize_prompts(model: Model, texts: Sequence[str], max_tokens: int,
                     min_tokens: int = 1) -> Tuple[List[np.ndarray], List[int]]:
    """Token ids of each text (no BOS, as the study), truncated to its first ``max_tokens`` tokens
    (at most the model's ``n_positions``). Returns ``(ids, kept)``: the prompts with at least
    ``min_tokens`` tokens and their indices in ``texts``."""
    max_tokens = min(int(max_tokens), model.config.n_positions)
    out, kept = [], []
    for i, text in enumerate(texts):
        ids = model.to_tokens(text)[:max_tokens]
        if ids.size >= min_tokens:
            out.append(ids.astype(np.int32))
            kept.append(i)
    return out, kept


def pad_prompts(prompts: Sequence[np.ndarray], width: Optional[int] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, width]`` (pad id 0, masked by the lengths) and lengths ``[B]``."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    width = int(width or lengths.max())
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return ids, lengths


# ----------------------------------------------------------------------------- batching

def batch_rows(arrays: Sequence[np.ndarray], batch_size: int, n_devices: int = 1
               ) -> Iterator[Tuple[int, int, List[np.ndarray]]]:
    """``(start, stop, chunk)`` over the leading axis, each chunk padded (by repeating its last
    row) to ``batch_size`` rounded up to a multiple of ``n_devices``: one shape, one program."""
    n = len(arrays[0])
    size = -(-max(1, int(batch_size)) // n_devices) * n_devices
    for start in range(0, n, size):
        stop = min(n, start + size)
        chunk = []
        for a in arrays:
            c = np.asarray(a[start:stop])
            if stop - start < size:
                c = np.concatenate([c, np.repeat(c[-1:], size - (stop - start), axis=0)])
            chunk.append(c)
        yield start, stop, chunk


def sharded(fn, mesh: Mesh, n_replicated: int, n_split: int):
    """``jit(shard_map(fn))`` with the first ``n_replicated`` arguments replicated and the next
    ``n_split`` (pytrees of batch-leading arrays) split over the mesh's batch axis."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * n_replicated + (P(AXIS),) * n_split,
                           out_specs=P(AXIS), check_vma=False)
    return jax.jit(mapped)


# ----------------------------------------------------------------------------- collection

def check_site(model: Model, layer: int, site: str) -> int:
    """Validates an entry site (a residual component) of ``layer``; returns its entry index
    (:func:`plateau_jax.model.sites.entry_index`)."""
    return sites_lib.entry_index(layer, site, model.config)


def site_activations(params, cfg, ids, lengths, layer, *, site: str):
    """``blocks.{layer}.hook_{site}`` of right-padded prompts ``ids`` ``[B, T]``: ``[B, T, d]``.

    ``layer`` is a runtime value (every layer is recorded, one is kept), so one compiled program
    serves every layer. Pure: composes with ``jit``/``vmap``/``grad``."""
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = core.embed(params, cfg, ids, positions)
    local = sites_lib.local_name(site)
    iv = core.record_layers({local: range(cfg.n_layer)}, cfg.n_layer)
    _, recs, _ = core.run_blocks(params, cfg, x, positions=positions, iv=iv)
    return jax.lax.dynamic_index_in_dim(recs[local], layer, 0, keepdims=False)


def last_position(acts, lengths):
    """``acts`` ``[B, T, d]`` at each prompt's last real position ``lengths - 1``: ``[B, d]``."""
    return jnp.take_along_axis(acts, (lengths - 1)[:, None, None], axis=1)[:, 0]


@functools.lru_cache(maxsize=32)
def _collect_program(cfg, site: str, positions: str, precision: str, mesh: Mesh):
    """One sharded program per (model shape, site kind, positions, precision, mesh); the layer
    is a runtime argument."""
    def fn(params, layer, ids, lengths):
        with jax.default_matmul_precision(precision):
            acts = site_activations(params, cfg, ids, lengths, layer, site=site)
        return last_position(acts, lengths) if positions == "last" else acts
    return sharded(fn, mesh, 2, 2)


def _rows_mask(lengths, width, positions: str, skip_first: bool) -> np.ndarray:
    """Which of the ``[B, width]`` positions are reference rows (positions='all')."""
    pos = np.arange(width)[None, :]
    return (pos < lengths[:, None]) & ((pos >= 1) if skip_first else True)


def count_rows(prompts: Sequence[np.ndarray], positions: str, skip_first: bool = True) -> int:
    """How many activations :func:`collect_activations` returns for these prompts."""
    if positions == "last":
        return len(prompts)
    return int(sum(max(0, len(p) - (1 if skip_first else 0)) for p in prompts))


def collect_activations(model: Model, prompts: Sequence[np.ndarray], layer: int,
                        site: str = "resid_post", *, positions: str = "last",
                        skip_first: bool = True, batch_size: int = 32, out_path: Optional[str] = None,
                        mesh: Optional[Mesh] = None, progress_desc: Optional[str] = None,
                        min_rows: int = 0) -> np.ndarray:
    """Activations ``[n, d]`` (float32) of ``prompts`` at ``blocks.{layer}.hook_{site}``.

    Args:
      prompts: token id arrays (each ``[T_i]``, ``1 <= T_i <= n_positions``).
      positions: "last" (one row per prompt, in order) or "all" (every real position of every
        prompt, prompt by prompt, left out position 0 when ``skip_first``).
      batch_size: prompts per compiled call (rounded up to a multiple of the device count).
      out_path: stream the rows into this ``.npy`` (complete file renamed into place at the end)
        and return it memory-mapped; None keeps them in memory.
      mesh: a 1-D device mesh (default: every device, as the sweep).
      min_rows: raise before any work when fewer rows would come out (e.g. 2 for a covariance).
    """
    check_site(model, layer, site)
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r}: expected one of {POSITIONS}.")
    if not len(prompts):
        raise ValueError("no prompts to collect activations from.")
    cfg = model.config
    for i, p in enumerate(prompts):
        if not 1 <= len(p) <= cfg.n_positions:
            raise ValueError(f"prompt {i} has {len(p)} tokens; each needs 1..{cfg.n_positions}.")
    n = count_rows(prompts, positions, skip_first)
    if n < min_rows:
        raise ValueError(f"these prompts give {n} reference activation(s) at {positions!r} "
                         f"positions; at least {min_rows} are needed (a covariance needs 2): "
                         "pass more prompts or positions='all'.")
    mesh = mesh or make_mesh()
    ids, lengths = pad_prompts(prompts)
    fn = _collect_program(cfg, site, positions, model.matmul_precision, mesh)
    d = cfg.d_model
    tmp = None
    if out_path:
        directory = os.path.dirname(os.path.abspath(out_path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(out_path) + ".",
                                   suffix=".npy")
        os.close(fd)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
    else:
        out = np.empty((n, d), np.float32)
    layer_arr = jnp.asarray(layer, jnp.int32)
    chunks = batch_rows([ids, lengths], batch_size, mesh.devices.size)
    total = -(-len(prompts) // max(1, batch_size))
    if progress_desc:
        chunks = files.progress(chunks, progress_desc, total=total)
    row = 0
    try:
        for start, stop, (cid, clen) in chunks:
            acts = np.asarray(fn(model.params, layer_arr, cid, clen), np.float32)[: stop - start]
            if positions == "all":
                acts = acts[_rows_mask(lengths[start:stop], ids.shape[1], positions, skip_first)]
            out[row: row + len(acts)] = acts
            row += len(acts)
        if out_path:
            out.flush()
            del out
            os.replace(tmp, out_path)
            tmp = None
            return np.load(out_path, mmap_mode="r")
        return out
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- statistics

class MomentAccumulator:
    """Streaming float64 mean and covariance (Chan et al.'s pairwise combination of batches)."""

    def __init__(self, d: int):
        self.n, self.mean, self.m2 = 0, np.zeros(d), np.zeros((d, d))

    def add(self, x) -> None:
        x = np.asarray(x, np.float64)
        k = x.shape[0]
        if k == 0:
            return
        mb = x.mean(axis=0)
        c = x - mb
        m2b = c.T @ c
        n = self.n + k
        delta = mb - self.mean
        self.m2 += m2b + np.outer(delta, delta) * (self.n * k / n)
        self.mean = self.mean + delta * (k / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 activations; got {self.n}.")
        return self.m2 / (self.n - 1)


def median_pair_distance(acts, max_sample: int = 2048, seed: int = 0) -> float:
    """Median of ``|x_i - x_j|`` over every pair ``i < j`` of (a seeded sample of at most
    ``max_sample``) rows of ``acts`` ``[n, d]``, in float64."""
    acts = np.asarray(acts)
    n = acts.shape[0]
    if n < 2:
        raise ValueError(f"a typical distance needs at least 2 activations; got {n}.")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_sample), replace=False))
    x = np.asarray(acts[idx], np.float64)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    iu = np.triu_indices(len(x), k=1)
    return float(np.median(np.sqrt(d2[iu])))


@dataclasses.dataclass(frozen=True)
class Reference:
    """Statistics of a reference set at ``blocks.{layer}.hook_{site}`` (see the module docstring).

    Attributes:
      mean: ``[d]`` float64; cov: ``[d, d]`` float64 (divisor n - 1); n: number of activations;
      typical_distance: ``D`` (median pairwise distance, residual-stream units), the unit of
      every step length; positions: "last" or "all"; model_name: where the weights came from.
    """

    layer: int
    site: str
    positions: str
    n: int
    mean: np.ndarray
    cov: np.ndarray
    typical_distance: float
    model_name: str = ""

    @property
    def d(self) -> int:
        return self.mean.shape[0]

    def gaussian_factor(self, rtol: float = 1e-9) -> np.ndarray:
        """``F`` ``[d, d]`` with ``F F^T = cov`` (eigendecomposition, float64), so that
        ``mean + F z``, ``z ~ N(0, I)``, has the reference mean and covariance. Raises
        :class:`SingularCovarianceError` when the smallest eigenvalue is below ``rtol`` times
        the largest (e.g. fewer than d + 1 activations)."""
        w, v = np.linalg.eigh(self.cov)
        if not np.all(np.isfinite(w)) or w[-1] <= 0 or w[0] <= rtol * w[-1]:
            rank = int(np.sum(w > rtol * max(w[-1], 0.0)))
            raise SingularCovarianceError(
                f"the reference covariance at blocks.{self.layer}.hook_{self.site} is singular "
                f"(numerical rank {rank} of {self.d}, from {self.n} activations): a Gaussian "
                f"with it cannot be sampled. Use more than {self.d} reference activations "
                "(e.g. positions='all', or more prompts).")
        return v * np.sqrt(w)[None, :]

    def save(self, path: str) -> None:
        """Writes an ``.npz`` atomically (arrays: mean, cov, n, typical_distance, layer, site,
        positions, model_name)."""
        files.atomic_save_npz(path, mean=self.mean, cov=self.cov, n=np.int64(self.n),
                              typical_distance=np.float64(self.typical_distance),
                              layer=np.int64(self.layer), site=np.str_(self.site),
                              positions=np.str_(self.positions),
                              model_name=np.str_(self.model_name))

    @classmethod
    def load(cls, path: str) -> "Reference":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference file {path!r} does not exist.")
        with np.load(path) as f:
            return cls(layer=int(f["layer"]), site=str(f["site"]), positions=str(f["positions"]),
                       n=int(f["n"]), mean=np.asarray(f["mean"], np.float64),
                       cov=np.asarray(f["cov"], np.float64),
                       typical_distance=float(f["typical_distance"]),
                       model_name=str(f["model_name"]))


def reference_from_activations(acts, layer: int, site: str, positions: str, model_name: str = "",
                               batch: int = 4096, max_pairs_sample: int = 2048,
                               seed: int = 0) -> Reference:
    """:class:`Reference` statistics of activations ``[n, d]`` (float64, read block by block, so
    a memory-mapped file never has to fit in memory)."""
    n, d = acts.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 reference activations; got {n}.")
    acc = MomentAccumulator(d)
    for start in range(0, n, batch):
        acc.add(acts[start: start + batch])
    return Reference(layer=int(layer), site=site, positions=positions, n=n, mean=acc.mean,
                     cov=acc.covariance(),
                     typical_distance=median_pair_distance(acts, max_pairs_sample, seed),
                     model_name=model_name)


def build_reference(model: Model, prompts: Sequence[np.ndarray], layer: int,
                    site: str = "resid_post", *, positions: str = "all", skip_first: bool = True,
                    batch_size: int = 32, out_dir: Optional[str] = None,
                    mesh: Optional[Mesh] = None, progress_desc: Optional[str] = None,
                    seed: int = 0) -> Tuple[Reference, np.ndarray]:
    """Collects the reference activations and their statistics. With ``out_dir``, writes
    ``reference_activations.npy`` (streamed) and ``reference.npz`` there. Returns
    ``(reference, activations)``."""
    path = os.path.join(out_dir, "reference_activations.npy") if out_dir else None
    acts = collect_activations(model, prompts, layer, site, positions=positions,
                               skip_first=skip_first, batch_size=batch_size, out_path=path,
                               mesh=mesh, progress_desc=progress_desc, min_rows=2)
    ref = reference_from_activations(acts, layer, site, positions, model.name, seed=seed)
    if out_dir:
        ref.save(os.path.join(out_dir, "reference.npz"))
    return ref, acts
