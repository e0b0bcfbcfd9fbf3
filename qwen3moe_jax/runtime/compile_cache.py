"""JAX's persistent compilation cache for the command line: XLA's compiled programs are written to a per-user
folder and read back by the next process that compiles the same program (same model shape, dtype, flags, jax
version and device), so a second `qwen3moe-jax serve` or `generate` skips most of its compile time.

Where it goes, first that applies: the `--compile-cache DIR` option, the QWEN3MOE_JAX_COMPILE_CACHE environment
variable, then $XDG_CACHE_HOME/qwen3moe-jax/jax (~/.cache/qwen3moe-jax/jax). `off` (or `--no-compile-cache`)
turns it off. JAX still traces and lowers each step in every process: the cache saves XLA's compilation, which
is most of the time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

ENV_VAR = "QWEN3MOE_JAX_COMPILE_CACHE"
OFF = "off"
# jax.monitoring events of the persistent cache (jax/_src/compiler.py, jax 0.10): a program read from it, and
# a program compiled afresh and written to it.
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3moe-jax" / "jax"


def resolve(option: str | None) -> Path | None:
    """The cache folder for a --compile-cache value (None: not given), or None when it is off."""
    setting = option or os.environ.get(ENV_VAR) or str(default_dir())
    return None if setting.strip().lower() == OFF else Path(setting).expanduser()


def enable(directory: Path | None) -> None:
    """Point JAX's persistent compilation cache at `directory` (None: leave it off). Call before the first
    compilation: JAX sets its cache up once per process."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, however quick to compile or small: a server compiles a handful of steps, each
    # worth keeping (JAX's defaults skip programs that compiled in under a second).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit


class CacheLookups:
    """Counts the programs JAX reads from the persistent cache (hits) and compiles and writes to it (misses)
    while it is entered (a jax.monitoring listener)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def __enter__(self) -> CacheLookups:
        jax.monitoring.register_event_listener(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_listener(self._record)

    def summary(self) -> str:
        """', N of M programs from the compile cache' when any came from it, else ''."""
        return f", {self.hits} of {self.hits + self.misses} programs from the compile cache" if self.hits else ""

    def _record(self, event: str, **kwargs: Any) -> None:
        if event == HIT_EVENT:
            self.hits += 1
        elif event == MISS_EVENT:
            self.misses += 1
