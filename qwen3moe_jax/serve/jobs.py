"""The bridge between the event loop and the scheduler's thread: a `Job` per request in flight, whose queue the
scheduler's emitter fills and the response reads, and the `Worker` thread that runs the scheduler's loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from qwen3moe_jax.runtime.generation import Event
from qwen3moe_jax.runtime.scheduler import Request, Scheduler

_DONE = object()


@dataclasses.dataclass
class Job:
    """One request in flight: the scheduler's request, and the queue its response reads from."""

    loop: asyncio.AbstractEventLoop
    request: Request
    cancel: Callable[[], None]  # ends the request at the scheduler's next step (a no-op once it ended)
    out: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        """From the scheduler's thread: an Event, the exception the request ended with, or None (it is over)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, _DONE if item is None else item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The request's events as they arrive; the exception it ended with, if any, is raised."""
        while (item := await self.out.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item


class Worker:
    """Runs the scheduler's loop on a thread of its own, off the event loop, until stopped."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=scheduler.serve_forever, args=(self.stopped,), name="generation",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)
