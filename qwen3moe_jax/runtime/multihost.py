"""Serving from several processes (hosts): process 0 takes the HTTP requests, the others follow its steps.

Under jax.distributed every jit step over a multi-process mesh is one program that all processes must run,
in the same order, with the same inputs. `qwen3moe-jax generate` gets that for free (every process runs the
same command); a server does not, since only process 0 sees the requests. So process 0's scheduler runs
each engine step through `Leader.call`, which first sends the step (its name and plain-value arguments) to
the other processes; they run `follow`, which replays the same Engine.call from those messages. The
messages travel as small JAX collectives (multihost_utils.broadcast_one_to_all), nothing home-made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen3moe_jax.errors import Qwen3MoeError
from qwen3moe_jax.runtime.engine import Engine, StepTokens


def _broadcast_json(message: dict | None) -> dict:
    """Process 0's message (a JSON-able dict) on every process; the others pass None."""
    # NumPy arrays (a constrained row's token mask) travel as lists.
    text = json.dumps(message, default=lambda a: np.asarray(a).tolist())
    data = np.frombuffer(text.encode(), np.uint8) if message is not None else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    buffer = data if data is not None else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


class FollowerLost(Qwen3MoeError):
    """A follower process is gone (its collective failed): the multi-process server cannot run a step."""


class Leader:
    """Process 0's side: `call` is Engine.call, sending each step to the followers first. When a send fails
    (a follower died), the step fails with FollowerLost, so the requests in flight end with that error, and
    `on_lost` runs once (the server uses it to stop serving: it cannot run a step without its followers)."""

    def __init__(self, engine: Engine, on_lost: Callable[[], None]):
        self.engine, self.on_lost = engine, on_lost
        self.lost: Exception | None = None

    def call(self, op: str, **kwargs: Any) -> StepTokens:
        if self.lost is None:
            try:
                _broadcast_json({"op": op, **kwargs})
            except Exception as err:
                self.lost = err
                self.on_lost()
        if self.lost is not None:
            raise FollowerLost(f"a follower process is gone ({self.lost}); this server is shutting down")
        return self.engine.call(op, **kwargs)

    def shutdown(self) -> None:
        """Release the followers (see `shutdown`), unless one is gone: then nobody would meet process 0."""
        if self.lost is None:
            shutdown()


def follow(engine: Engine) -> None:
    """On processes other than 0: replay process 0's engine steps until it shuts down."""
    while (message := _broadcast_json(None)).get("shutdown") is None:
        try:
            engine.call(**message)
        except Exception:  # process 0 hit the same error in the same step and resets its engine alike
            engine.reset()
    jax.distributed.shutdown()  # meets process 0 at the shutdown barrier


def shutdown() -> None:
    """Process 0: release the followers from `follow`, then leave the job with them. Process 0 hosts the
    job's coordination service, so it must not exit before the others have reached the shutdown barrier."""
    _broadcast_json({"shutdown": True})
    jax.distributed.shutdown()
