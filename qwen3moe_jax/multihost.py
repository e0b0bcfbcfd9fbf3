"""Serving from several processes (hosts): process 0 takes the HTTP requests, the others follow its steps.

Under jax.distributed every jit step over a multi-process mesh is one program that all processes must run,
in the same order, with the same inputs. `qwen3moe-jax generate` gets that for free (every process runs the
same command); a server does not, since only process 0 sees the requests. So process 0's engine announces
each request (prompt, sampling settings, token limit) and, token by token, whether it goes on; the other
processes run `follow`, which replays the same Engine.tokens calls from those messages. The messages travel
as small JAX collectives (multihost_utils.broadcast_one_to_all), nothing home-made.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen3moe_jax.engine import Engine
from qwen3moe_jax.sampling import SamplingParams

CONTINUE, STOP = 1, 0


def _broadcast_json(message: dict | None) -> dict:
    """Process 0's message (a JSON-able dict) on every process; the others pass None."""
    data = np.frombuffer(json.dumps(message).encode(), np.uint8) if message is not None else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    buffer = data if data is not None else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def _broadcast_flag(flag: int | None) -> int:
    return int(multihost_utils.broadcast_one_to_all(np.int32(0 if flag is None else flag)))


def _sampling_fields(sampling: SamplingParams) -> dict:
    # Only what the device steps read; stop strings and ids are process 0's business.
    names = ("temperature", "top_k", "top_p", "repeat_penalty", "repeat_last_n", "seed")
    return {name: getattr(sampling, name) for name in names}


def lead(
    engine: Engine, prompt: Sequence[int], sampling: SamplingParams, limit: int
) -> Iterator[tuple[int, jax.Array]]:
    """Engine.tokens on process 0 of a multi-process server, telling the followers each step to take."""
    _broadcast_json({"prompt": list(prompt), "sampling": _sampling_fields(sampling), "limit": limit})
    steps = engine.local_tokens(prompt, sampling, limit)
    try:
        for item in steps:
            yield item
            _broadcast_flag(CONTINUE)  # the consumer wants the next token: the followers step too
    finally:
        _broadcast_flag(STOP)
        steps.close()


def follow(engine: Engine) -> None:
    """On processes other than 0: replay process 0's requests until it shuts down."""
    while (message := _broadcast_json(None)).get("shutdown") is None:
        sampling = dataclasses.replace(SamplingParams(), **message["sampling"])
        steps = engine.local_tokens(message["prompt"], sampling, message["limit"])
        try:
            next(steps)
            while _broadcast_flag(None) == CONTINUE:
                next(steps, None)
        except Exception:  # process 0 hit the same error at the same step and ends the request with STOP
            while _broadcast_flag(None) == CONTINUE:
                pass
        finally:
            steps.close()
    jax.distributed.shutdown()  # meets process 0 at the shutdown barrier


def shutdown() -> None:
    """Process 0: release the followers from `follow`, then leave the job with them. Process 0 hosts the
    job's coordination service, so it must not exit before the others have reached the shutdown barrier."""
    _broadcast_json({"shutdown": True})
    jax.distributed.shutdown()
