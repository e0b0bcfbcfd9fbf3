"""Serving from several processes (hosts): process 0 takes the HTTP requests, the others follow its steps.

Under jax.distributed every jit step over a multi-process mesh is one program that all processes must run,
in the same order, with the same inputs. `qwen3moe-jax generate` gets that for free (every process runs the
same command); a server does not, since only process 0 sees the requests. So process 0's scheduler runs
each engine step through `leader_call`, which first sends the step (its name and plain-value arguments) to
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

from qwen3moe_jax.engine import Engine, StepTokens


def _broadcast_json(message: dict | None) -> dict:
    """Process 0's message (a JSON-able dict) on every process; the others pass None."""
    data = np.frombuffer(json.dumps(message).encode(), np.uint8) if message is not None else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    buffer = data if data is not None else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def leader_call(engine: Engine) -> Callable[..., StepTokens]:
    """Engine.call on process 0 of a multi-process server, sending each step to the followers first."""

    def call(op: str, **kwargs: Any) -> StepTokens:
        _broadcast_json({"op": op, **kwargs})
        return engine.call(op, **kwargs)

    return call


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
