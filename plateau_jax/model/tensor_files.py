"""Reading checkpoint tensors one at a time, with every header checked before any data is read.

A :class:`TensorSource` lists a checkpoint's tensors (name, shape, dtype) from the file headers
alone and reads one tensor on request, so the loader can refuse a wrong checkpoint (missing,
unexpected or misshapen tensors, truncated files) before allocating anything, and then stream
the tensors with at most one of them in host memory beyond the buffer being filled.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np

_ST_DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
              "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("int64"),
              "I32": np.dtype("int32"), "I16": np.dtype("int16"), "I8": np.dtype("int8"),
              "U8": np.dtype("uint8"), "BOOL": np.dtype("bool")}
# A safetensors header is JSON of a few hundred bytes per tensor; refuse absurd lengths before
# reading them (a corrupt length would otherwise allocate that much).
MAX_HEADER_BYTES = 256 * 2 ** 20


class TensorFileError(ValueError):
    """A weights file is damaged or not what its name says; the message names the file."""


class TensorSource:
    """Tensors of a checkpoint: ``shapes`` (name -> shape), ``dtypes``, and ``read(name)``."""

    def __init__(self):
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, np.dtype] = {}

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """One or more ``.safetensors`` files (a sharded checkpoint is several)."""

    def __init__(self, paths: List[str]):
        super().__init__()
        self._where: Dict[str, Tuple[str, int, int]] = {}
        for path in paths:
            for name, (dtype, shape, start, end) in read_header(path).items():
                if name in self._where:
                    raise TensorFileError(f"{path}: tensor {name!r} also appears in "
                                          f"{self._where[name][0]}.")
                self.shapes[name], self.dtypes[name] = shape, dtype
                self._where[name] = (path, start, end)

    def read(self, name: str) -> np.ndarray:
        path, start, end = self._where[name]
        arr = np.empty(self.shapes[name], self.dtypes[name])
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        if got != end - start:
            raise TensorFileError(f"{path}: truncated data for tensor {name!r} (the file ends "
                                  f"{end - start - got} bytes early). Download it again.")
        return arr


def read_header(path: str) -> Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]]:
    """``{name: (dtype, shape, start, end)}`` (absolute byte offsets) of a safetensors file.

    Checks, before anything large is read: the file holds an 8-byte header length; the header is
    JSON within the file; every entry has a known dtype, a shape of non-negative ints and an
    in-file byte range whose size matches shape and dtype.
    """
    size = os.path.getsize(path)
    bad = lambda why: TensorFileError(
        f"{path} is not a valid safetensors file: {why}. Download or convert it again.")
    if size < 8:
        raise bad(f"it is {size} bytes long (an 8-byte header length comes first)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header claims {n} bytes but the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks a known dtype, a shape or data_offsets") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != nbytes:
            raise bad(f"entry {name!r} (shape {list(shape)}, {info['dtype']}) has a byte range "
                      f"[{start}, {end}) that does not hold {nbytes} bytes")
        if 8 + n + end > size:
            raise bad(f"tensor {name!r} ends at byte {8 + n + end}, past the end of the "
                      f"{size}-byte file (truncated download?)")
        out[name] = (dtype, shape, 8 + n + start, 8 + n + end)
    return out


class PickleSource(TensorSource):
    """A torch ``pytorch_model.bin`` read by the restricted unpickler (no torch import); the
    whole state dict is read at once."""

    def __init__(self, path: str):
        super().__init__()
        from plateau_jax.model.pickle_weights import load_torch_state_dict
        self._tensors = load_torch_state_dict(path)
        for name, arr in self._tensors.items():
            self.shapes[name], self.dtypes[name] = tuple(arr.shape), arr.dtype

    def read(self, name: str) -> np.ndarray:
        return self._tensors[name]
