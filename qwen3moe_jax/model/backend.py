"""Which platform the program being traced is for. Usually the process's default backend; ahead-of-time
compilation for a device that is not here (tools/aot.py: a GPU's program compiled on a CPU host) says otherwise, so
that the choices made while tracing (the MoE kernel, the C++ CPU kernels, Pallas' interpreter) are the target's."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("qwen3moe_jax_target_platform", default=None)


def platform() -> str:
    """The platform being traced for: "cpu", "gpu" or "tpu"."""
    return _target.get() or jax.default_backend()


@contextlib.contextmanager
def tracing_for(target: str) -> Iterator[None]:
    """Trace for `target` ("gpu", ...) inside the block, whatever backend this process runs."""
    token = _target.set(target)
    try:
        yield
    finally:
        _target.reset(token)
