"""Reads PyTorch ``pytorch_model.bin`` zip checkpoints into numpy without importing torch.

Unpickling can run arbitrary code, so the loader only calls this on explicit opt-in
(``allow_pickle=True``), and even then the unpickler below accepts nothing but the handful of
globals a plain tensor state dict needs; anything else is refused.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Dict

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive, self._root = archive, root

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain tensor state dicts are accepted.")

    def persistent_load(self, pid):
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        raw = self._archive.read(f"{self._root}/data/{key}")
        return np.frombuffer(raw, dtype=dtype)


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """``{name: array}`` from a torch zip checkpoint (torch >= 1.6 format).

    Raises ``ValueError`` naming the file when it is not such a checkpoint or holds anything
    but plain tensors."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip-format PyTorch checkpoint (the legacy format is "
                         "not supported); convert it to safetensors.")
    with zipfile.ZipFile(path) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl "
                             "inside); convert it to safetensors.")
        root = pkl[: -len("/data.pkl")]
        try:
            with zf.open(pkl) as f:
                state = _StateDictUnpickler(f, zf, root).load()
        except (pickle.UnpicklingError, KeyError, EOFError) as e:
            raise ValueError(f"{path}: {e}. Only plain tensor state dicts are read; convert the "
                             "checkpoint to safetensors.") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path} does not hold a plain tensor state dict; convert it to "
                         "safetensors.")
    return {k: np.asarray(v) for k, v in state.items()}
