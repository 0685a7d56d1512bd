"""Atomic result files, run metadata and progress bars for experiment scripts."""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from typing import Any, Dict, Iterable, Optional

import numpy as np

_PACKAGES = ("plateau_jax", "jax", "jaxlib", "flax", "transformers", "numpy", "optax",
             "safetensors", "matplotlib")


def prepare_output_dir(path: str) -> str:
    """Creates ``path`` if needed and checks it is writable; clear error otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"Output directory {path!r} cannot be written ({e.strerror or e}); "
                      "pass a writable --output_dir.") from e
    return path


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes to a temp file in the same directory, fsyncs, then renames over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_npz(path: str, **arrays) -> None:
    """``np.savez_compressed`` that never leaves a partial file at ``path``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_savefig(fig, path: str, **kwargs) -> None:
    """Saves a matplotlib figure atomically (format from the extension)."""
    buf = io.BytesIO()
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def run_metadata() -> Dict[str, Any]:
    """Package versions, devices, host and time, for ``config.json``."""
    import jax

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "argv": sys.argv,
    }


def write_config(output_dir: str, resolved: Dict[str, Any], name: str = "config.json") -> str:
    """Writes ``{"config": resolved, **run_metadata()}`` atomically; returns its path."""
    path = os.path.join(output_dir, name)
    atomic_write_json(path, {"config": resolved, **run_metadata()})
    return path


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, **kwargs):
    """A tqdm progress bar on stderr (quiet when PLATEAU_JAX_NO_PROGRESS is set)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True,
                disable=bool(os.environ.get("PLATEAU_JAX_NO_PROGRESS")), **kwargs)
