"""Compilation: JAX's persistent compilation cache, and counting what a piece of code compiles.

A second run of the same configuration reads its programs from the persistent cache instead of
compiling them again (XLA compilation dominates a cold run of GPT-2 Large on a GPU). The scripts
turn the cache on by default in :data:`DEFAULT_CACHE_DIR`; ``--compilation_cache=DIR`` moves it
and ``--compilation_cache=`` turns it off.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Optional

import jax
from jax import monitoring

log = logging.getLogger(__name__)

_CACHE_ROOT = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
DEFAULT_CACHE_DIR = os.path.join(_CACHE_ROOT, "plateau_jax", "xla")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable_compilation_cache(path: Optional[str] = DEFAULT_CACHE_DIR) -> Optional[str]:
    """Points JAX's persistent compilation cache at ``path`` (``~`` expanded; created if needed).

    ``None`` or ``""`` turns the cache off. A directory that cannot be created or written is
    reported once as a warning and the run goes on without the cache. Returns the directory in
    use, or None. Call it before the first compilation.
    """
    if not path:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        log.warning("compilation cache %s cannot be written (%s); running without it. Pass "
                    "--compilation_cache=DIR to move it or --compilation_cache= to silence this.",
                    path, e.strerror or e)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: even small ones add up over the dozens a study compiles.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileCounter:
    """Counts the XLA programs compiled inside a ``with`` block (``count``), the programs read
    from the persistent cache instead (``cache_hits``) and the seconds spent in the backend
    (``seconds``, loading from the cache included). Programs already compiled in this process
    count as neither.
    """

    _active: list = []
    _registered = False

    def __init__(self):
        self._backend_calls = 0
        self.cache_hits = 0
        self.seconds = 0.0

    @property
    def count(self) -> int:
        return self._backend_calls - self.cache_hits

    @classmethod
    def _duration(cls, event: str, duration: float, **_):
        if event == _COMPILE_EVENT:  # fired for compilations and for cache loads alike
            for counter in cls._active:
                counter._backend_calls += 1
                counter.seconds += duration

    @classmethod
    def _event(cls, event: str, **_):
        if event == _CACHE_HIT_EVENT:
            for counter in cls._active:
                counter.cache_hits += 1

    def __enter__(self) -> "CompileCounter":
        if not CompileCounter._registered:
            monitoring.register_event_duration_secs_listener(CompileCounter._duration)
            monitoring.register_event_listener(CompileCounter._event)
            CompileCounter._registered = True
        CompileCounter._active.append(self)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        CompileCounter._active.remove(self)
        self.wall = time.perf_counter() - self._t0
        return False
