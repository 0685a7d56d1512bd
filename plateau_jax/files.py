"""Atomic result files, atomic publication of whole runs, run metadata and progress bars.

Single files are written with :func:`atomic_write_bytes` (temp file, fsync, rename). A whole
run (config, arrays, figures) is published with :class:`Publication`: it is staged in a hidden
directory of ``output_dir`` and made visible in one atomic step by replacing the symlink
``output_dir/<name>`` (see the class).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

_PACKAGES = ("plateau_jax", "jax", "jaxlib", "flax", "transformers", "numpy", "optax",
             "safetensors", "matplotlib")


def prepare_output_dir(path: str, flag: str = "--output_dir") -> str:
    """Creates ``path`` if needed and checks it is writable; clear error otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"Output directory {path!r} cannot be written ({e.strerror or e}); "
                      f"pass a writable {flag}.") from e
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


def fsync_dir(path: str) -> None:
    """fsyncs a directory (so renames and new entries in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- test hook

def fault_point(name: str) -> None:
    """Test hook for fault-injection tests: if ``PLATEAU_JAX_TEST_INTERRUPT`` is
    ``"<name>:<SIGNAL>"`` (e.g. ``"publish:SIGKILL"``), the process sends itself that signal here.
    A no-op otherwise."""
    spec = os.environ.get("PLATEAU_JAX_TEST_INTERRUPT", "")
    if spec.partition(":")[0] != name:
        return
    os.kill(os.getpid(), getattr(signal, spec.partition(":")[2] or "SIGKILL"))
    time.sleep(10)  # a SIGKILL lands during this sleep; SIGINT raises KeyboardInterrupt in it


# ----------------------------------------------------------------------------- publication

class OutputConflictError(ValueError):
    """The output directory already holds another configuration's results (or is locked)."""


def _json_normal(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_differences(old: dict, new: dict, ignore: Sequence[str] = ()) -> List[str]:
    """``"key: old (on disk) vs new (now)"`` for every top-level key whose values differ."""
    old, new = _json_normal(old), _json_normal(new)
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ignore:
            continue
        if old.get(k, "<absent>") != new.get(k, "<absent>"):
            out.append(f"{k}: {old.get(k, '<absent>')!r} (on disk) vs {new.get(k, '<absent>')!r} (now)")
    return out


class Publication:
    """Stages one script's run in ``output_dir`` and publishes it with one atomic step.

    Layout: ``output_dir/<name>`` is a symlink to a hidden version directory
    ``output_dir/.<name>-<UTC time>-<pid>/`` holding the run's ``config.json``, arrays and
    figures. A run writes everything into a fresh version directory (invisible: nothing points
    to it) and :meth:`commit` publishes it by ``os.replace``-ing a new symlink over the name, then
    deletes the previous version. Readers of ``output_dir/<name>/...`` therefore see either the
    previous complete run or the new one, whenever the writer is interrupted (SIGINT, SIGKILL,
    power loss: files and directories are fsynced before the switch).

    Construction does every check before any work: the directory is created if needed and must be
    writable; an exclusive lock (``output_dir/.<name>.lock``, ``flock``: released by the kernel
    when the process dies) keeps two runs of the same script from writing the same directory; and
    a published run whose ``config`` differs from ``config`` (keys in ``ignore`` aside) is
    refused with :class:`OutputConflictError` naming the differences, unless ``overwrite``.
    Version directories and temporary links left by killed runs are deleted.

    Usage::

        pub = Publication(out, "plateaus", config, overwrite=flags.overwrite)
        with pub.staging() as stage:           # removed again if the block raises
            ...write files into stage...
            pub.commit(extra={"model_config": ...})   # writes stage/config.json, publishes
    """

    def __init__(self, output_dir: str, name: str, config: Dict[str, Any], *,
                 overwrite: bool = False, ignore: Sequence[str] = (), flag: str = "--output_dir"):
        self.root = os.path.abspath(output_dir)
        self.name = name
        self.link = os.path.join(self.root, name)
        self.config = dict(config)
        self.stage: Optional[str] = None
        self._lock_fd: Optional[int] = None
        prepare_output_dir(output_dir, flag)
        self._lock()
        try:
            self._check(overwrite, ignore)
            self.clean_stale()
        except BaseException:
            self.release()
            raise

    # -- checks
    def _lock(self) -> None:
        path = os.path.join(self.root, f".{self.name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputConflictError(
                    f"another run is writing {self.link} (lock {path} is held); wait for it or "
                    "use another --output_dir.") from None
            raise
        self._lock_fd = fd

    def release(self) -> None:
        """Releases the lock (also done by :meth:`commit`, :meth:`abort` and process exit)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def published(self) -> Optional[str]:
        """The published version directory, or None."""
        if os.path.islink(self.link) and os.path.isdir(self.link):
            return os.path.realpath(self.link)
        return None

    def _check(self, overwrite: bool, ignore: Sequence[str]) -> None:
        if os.path.lexists(self.link) and not os.path.islink(self.link):
            raise OutputConflictError(
                f"{self.link} exists but is not a published run (a symlink to a version "
                "directory, written by this version of plateau_jax); move it away or use another "
                "--output_dir.")
        current = self.published()
        if current is None or overwrite:
            return
        try:
            with open(os.path.join(current, "config.json")) as f:
                old = json.load(f).get("config", {})
        except (OSError, ValueError):
            raise OutputConflictError(f"{self.link} holds a run without a readable config.json; "
                                      "pass --overwrite to replace it.") from None
        diffs = config_differences(old, self.config, ignore)
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise OutputConflictError(
                f"{self.link} holds a run with another configuration ({shown}). Pass --overwrite "
                "to replace it, or use another --output_dir.")

    def clean_stale(self) -> List[str]:
        """Deletes version directories and temporary links of this name that are not published
        (left by killed runs). Safe: the lock is held. Returns what was removed."""
        current = self.published()
        removed = []
        for entry in os.listdir(self.root):
            path = os.path.join(self.root, entry)
            if entry.startswith(f".{self.name}.link-") and os.path.islink(path):
                os.unlink(path)
                removed.append(path)
            elif (entry.startswith(f".{self.name}-") and os.path.isdir(path)
                  and not os.path.islink(path) and os.path.realpath(path) != current
                  and path != self.stage):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # -- staging and publication
    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """Creates the hidden version directory and yields its path; removes it (and releases
        the lock) if the block exits without :meth:`commit`."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
        self.stage = os.path.join(self.root, f".{self.name}-{stamp}-{os.getpid()}")
        os.mkdir(self.stage)
        try:
            yield self.stage
        finally:
            if self.stage is not None:
                self.abort()

    def abort(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self.release()

    def commit(self, extra: Optional[Dict[str, Any]] = None) -> str:
        """Writes ``config.json`` (``{"config": config, **extra, **run_metadata()}``) into the
        stage, fsyncs it, publishes it and deletes the previous version. Returns the published
        path ``output_dir/<name>``."""
        if self.stage is None:
            raise RuntimeError("commit() outside staging().")
        stage = self.stage
        atomic_write_json(os.path.join(stage, "config.json"),
                          {"config": self.config, **(extra or {}), **run_metadata()})
        fsync_dir(stage)
        fault_point("before-publish")
        old = os.path.realpath(self.link) if os.path.islink(self.link) else None
        tmp = os.path.join(self.root, f".{self.name}.link-{os.getpid()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.basename(stage), tmp)
        os.replace(tmp, self.link)  # the atomic step
        fsync_dir(self.root)
        self.stage = None
        fault_point("after-publish")
        if old and old != stage and os.path.basename(old).startswith(f".{self.name}-"):
            shutil.rmtree(old, ignore_errors=True)
        self.release()
        return self.link

    def __del__(self):
        self.release()


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, **kwargs):
    """A tqdm progress bar on stderr (quiet when PLATEAU_JAX_NO_PROGRESS is set)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True,
                disable=bool(os.environ.get("PLATEAU_JAX_NO_PROGRESS")), **kwargs)
