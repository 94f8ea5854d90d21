"""jax's persistent compilation cache, so a restarted process loads its compiled steps from disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinfer" / "xla"


def enable(path: str | os.PathLike | None = None) -> str | None:
    """Turns the cache on in `path` (None: $JAXINFER_COMPILATION_CACHE, else ~/.cache/jaxinfer/xla; ""
    turns it off) and returns the directory in use. A directory the program already gave jax wins."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        path = os.environ.get("JAXINFER_COMPILATION_CACHE", str(default_dir()))
    if not str(path):
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every step is worth keeping: the engine compiles tens of shapes of about a second each.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    log.info("persistent compilation cache: %s", path)
    return str(path)
