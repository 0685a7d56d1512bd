"""How one checkpoint tensor maps onto the canonical, layer-stacked param tree."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import numpy as np

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One checkpoint tensor (per layer when ``hf`` contains ``{i}``).

    Attributes:
      hf: the key without the family's prefix, e.g. ``"h.{i}.attn.c_attn.weight"``.
      shape: the tensor's shape on disk.
      split: on-disk array -> ``{param path: array}`` (one layer's slice for per-layer tensors).
      join: ``get(path) -> array`` (one layer's slice) -> the on-disk array; inverse of ``split``.
      optional: absent from some checkpoints without harm (none today).
    """

    hf: str
    shape: Tuple[int, ...]
    split: Callable[[np.ndarray], Dict[Path, np.ndarray]]
    join: Callable[[Callable[[Path], np.ndarray]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def key(self, layer: Optional[int] = None) -> str:
        return self.hf.format(i=layer) if self.per_layer else self.hf


def same(path: Path, shape) -> Tuple[Callable, Callable]:
    """``split``/``join`` for a tensor stored as it is."""
    return (lambda a: {path: a}), (lambda get: get(path))


def transposed(path: Path) -> Tuple[Callable, Callable]:
    """``split``/``join`` for a 2-D tensor stored transposed (e.g. ``lm_head [V, d]`` as ``W_U [d, V]``)."""
    return (lambda a: {path: a.T}), (lambda get: get(path).T)


def rule(hf: str, shape, path: Path, kind: Callable = same) -> TensorRule:
    split, join = kind(path) if kind is transposed else kind(path, shape)
    return TensorRule(hf, tuple(shape), split, join)


def linear(hf: str, d_in: int, d_out: int, path: Path) -> TensorRule:
    """A ``torch.nn.Linear`` weight ``[out, in]`` on disk as a canonical ``[in, out]`` matrix."""
    return rule(hf, (d_out, d_in), path, transposed)


def heads_in(hf: str, n: int, k: int, d: int, path: Path) -> TensorRule:
    """A Linear weight ``[n k, d]`` projecting into ``n`` heads of width ``k`` (HF's q/k/v
    projections) as canonical ``[n, d, k]`` (``W_Q``, ``W_K``, ``W_V``)."""
    return TensorRule(hf, (n * k, d), lambda a: {path: a.reshape(n, k, d).transpose(0, 2, 1)},
                      lambda get: get(path).transpose(0, 2, 1).reshape(n * k, d))


def heads_out(hf: str, n: int, k: int, d: int, path: Path) -> TensorRule:
    """A Linear weight ``[d, n k]`` reading ``n`` heads of width ``k`` (HF's output projection)
    as canonical ``[n, k, d]`` (``W_O``)."""
    return TensorRule(hf, (d, n * k), lambda a: {path: a.T.reshape(n, k, d)},
                      lambda get: get(path).reshape(n * k, d).T)


def head_bias(hf: str, n: int, k: int, path: Path) -> TensorRule:
    """A bias ``[n k]`` of a projection into heads as canonical ``[n, k]`` (``b_Q``, ...)."""
    return TensorRule(hf, (n * k,), lambda a: {path: a.reshape(n, k)},
                      lambda get: get(path).reshape(n * k))
