"""The request loop, and its one owner: continuous batching over the engine's KV-cache rows.

Each request gets a row (a slot) of the engine's `max_batch` rows while it runs. Every `step`:
  1. cancelled requests leave (a running one frees its row);
  2. waiting requests are admitted into free rows, in arrival order: each takes the row holding the longest prefix
     of its prompt, else the least recently used (prefix_cache.py), and its prefill starts after that prefix
     (copied first from a busy row that holds more of it than any free row);
  3. at most `chunks_per_step` prompt chunks run (oldest admission first), one row each; the chunk that
     ends a prompt samples the request's first token;
  4. one decode block runs every row at once (`decode_steps` tokens per row, one compiled shape whatever
     the number of requests; rows without a decoding request are parked and left untouched).
Each token goes through its request's RequestEvents (stop tokens and strings, max_tokens, on_token) in
order; a request ends at the token that ends it, its later tokens of the block are dropped and its row is
free for the next step. A constrained request's Constraint (constraints.py) takes each token before it is
delivered, and works out the next step's mask: the decode block hands it its tokens as it runs
(engine.grammar), and the prefill's is taken here.
A request's tokens do not depend on the other rows: every step computes a row from that row alone, and
sampling draws are keyed by (seed, position) (tests/runtime/test_scheduler.py).

`Model.stream`, `complete`, `generate` and `complete_batch` drive `step` themselves (`events`); the server
runs `serve_forever` on a thread of its own and submits and cancels from its event loop (both thread-safe).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from qwen3moe_jax.errors import Qwen3MoeError, SamplingError
from qwen3moe_jax.runtime.constraints import Constraint
from qwen3moe_jax.runtime.engine import Engine, StepTokens
from qwen3moe_jax.runtime.generation import Event, Logprobs, RequestEvents
from qwen3moe_jax.runtime.prefix_cache import PrefixCache
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.speculative import UNKEPT, Speculator

log = logging.getLogger(__name__)

# The SamplingParams fields the device reads; stop strings and ids are the host's business.
DEVICE_FIELDS = ("temperature", "top_k", "top_p", "repeat_penalty", "repeat_last_n", "seed")
DEFAULT_CHUNKS_PER_STEP = 1


class QueueFull(Qwen3MoeError):
    """The wait queue holds max_queue requests already: try again later."""


class StepFailed(Qwen3MoeError):
    """A device step failed: every request that held a row ended with this error, and the KV cache was reset."""


Emit = Callable[[Any], None]  # an Event, an exception the request ended with, or None: the request is over


def first_step(constraints: list[Constraint | None]) -> dict[str, Any]:
    """The rows' `allowed` masks and `forced` tokens for a decode or verify step's first token, from the last token
    each constraint took (None for either when no row needs it: the engine's constant that asks for nothing)."""
    forced = [c.next_forced if c else -1 for c in constraints]
    return dict(allowed=[c.next_mask if c else None for c in constraints]
                if any(c is not None for c in constraints) else None,
                forced=forced if any(t >= 0 for t in forced) else None)


@dataclasses.dataclass(eq=False)
class Request:
    """One request: its prompt, settings and event maker, and where it stands in the scheduler."""

    prompt: list[int]
    sampling: SamplingParams
    events: RequestEvents
    emit: Emit | None = None  # where its events go (set by whoever submits it)
    constraint: Constraint | None = None  # its json_schema / regex / grammar, as a matcher
    row: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    position: int = 0  # the position of the token the row feeds to its next decode step
    cancelled: bool = False
    finished: bool = False
    admitted: int = 0  # admission order
    output: list[int] = dataclasses.field(default_factory=list)  # the tokens delivered so far
    score_from: int = 1  # with sampling.prompt_logprobs: the first prompt position scored

    @property
    def recordable(self) -> int | None:
        """The prompt tokens before the chunk of the first scoring position's predecessor, for a request that
        scores its prompt: what it may reuse, and what the prefix cache may record of it (None: no limit)."""
        return None if self.sampling.prompt_logprobs is None else self.score_from - 1

    def scores_chunk(self, start: int, length: int) -> bool:
        """Whether the chunk at `start` of `length` tokens holds a position whose next token is scored."""
        return self.recordable is not None and start + length - 1 >= self.score_from - 1 and \
            start <= len(self.prompt) - 2

    @property
    def cached(self) -> int:
        """Prompt tokens whose KV was reused (prefix_cache.py), not computed for this request: set at admission."""
        return self.events.cached_tokens

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.prefilled == len(self.prompt)


class Scheduler:
    """Owns the request loop over `engine`'s rows (see the module docstring).

    call: how an engine step is run, Engine.call by default; a multi-host leader passes one that also sends
    the step to its followers (multihost.py). max_queue bounds the requests waiting for a row beyond those
    the free rows take at the next step (None: no bound); chunks_per_step is the most prompt chunks per step
    (more: faster admission, longer gaps in the running streams); prefix_cache: reuse the KV of prompt prefixes
    that rows hold (prefix_cache.py; the attribute `prefix_cache.enabled` switches it later). With a `speculator`
    (speculative.py; the engine is then a SpeculativeEngine), a decode step where some row has a draft is a verify
    step instead."""

    def __init__(self, engine: Engine, chunks_per_step: int = DEFAULT_CHUNKS_PER_STEP, max_queue: int | None = None,
                 call: Callable[..., StepTokens] | None = None, prefix_cache: bool = True,
                 speculator: Speculator | None = None):
        self.engine = engine
        self.prefix_cache = PrefixCache(engine.batch_size, engine.chunk_size, prefix_cache)
        self._steps_seen = engine.steps_run  # the engine's steps the prefix cache has seen (_admit)
        self.speculator = speculator
        self.chunks_per_step = chunks_per_step
        self.max_queue = max_queue
        self.call = call or engine.call
        self.rows: list[Request | None] = [None] * engine.batch_size
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()  # guards `waiting` against submitting threads
        self._wake = threading.Condition(self._lock)
        self._stepping = threading.RLock()  # one step at a time
        self._emitting = threading.RLock()  # a token's event and a cancel, one at a time
        self._admissions = itertools.count()
        self._sampling_changed = True
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those whose KV was reused

    # ---------------------------------------------------------------------------- from any thread

    def submit(self, request: Request) -> None:
        """Queue a request (raises QueueFull when max_queue requests wait already beyond the free rows)."""
        with self._lock:
            waiting = sum(not r.cancelled for r in self.waiting)  # a cancelled one leaves at the next step
            if self.max_queue is not None and waiting - self.rows.count(None) >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for a row already (max_queue {self.max_queue})")
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """End a request at the next step (its row is freed then). No token's event reaches it once this returns,
        though a step may be running: its emitter gets only the end (None)."""
        with self._emitting:
            request.cancelled = True
        with self._lock:
            self._wake.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------------------- the loop

    def serve_forever(self, stop: threading.Event, idle_s: float = 0.1) -> None:
        """Step while there is work, sleep while there is none, until `stop` is set."""
        while not stop.is_set():
            with self._lock:
                if not self.waiting and not any(self.rows) and not stop.is_set():
                    self._wake.wait(idle_s)
            self.step()

    def events(self, request: Request) -> Iterator[Event]:
        """Submit `request` and step until it ends, yielding its events (closing this iterator cancels it)."""
        box: collections.deque = collections.deque()
        request.emit = box.append
        self.submit(request)
        try:
            while True:
                while box:
                    item = box.popleft()
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                self.step()
        finally:
            if not request.finished:
                self.cancel(request)
                with self._stepping:
                    self._drop_cancelled()

    def run_all(self, requests: list[Request]) -> list[list[Event]]:
        """Submit every request and step until all have ended; their events, in the order given."""
        boxes: list[list] = [[] for _ in requests]
        for request, box in zip(requests, boxes, strict=True):
            request.emit = box.append
            self.submit(request)
        while not all(r.finished for r in requests):
            self.step()
        for box in boxes:
            for item in box:
                if isinstance(item, BaseException):
                    raise item
        return [[e for e in box if e is not None] for box in boxes]

    def step(self) -> None:
        """One iteration: cancels, admissions, at most chunks_per_step prompt chunks, one decode block.

        What fails on the host for one request (its grammar, its text, its callback) ends that request alone, with
        the error; the other rows go on as if it had finished. A failed device step leaves the device state unknown
        (its buffers were donated): the KV cache is reset and every request holding a row ends with StepFailed."""
        with self._stepping:
            self._drop_cancelled()
            try:
                self._admit()
                if self._sampling_changed:
                    self._device("set_sampling", rows=[None if r is None else
                                                       {f: getattr(r.sampling, f) for f in DEVICE_FIELDS}
                                                       for r in self.rows])
                    self._sampling_changed = False
                prefilling = sorted((r for r in self.rows if r is not None and not r.decoding),
                                    key=lambda r: r.admitted)
                for request in prefilling[: self.chunks_per_step]:
                    self._prefill(request)
                if any(r is not None and r.decoding for r in self.rows):
                    self._decode()
            except Exception as err:
                failure = err if isinstance(err, StepFailed) else StepFailed(
                    f"a scheduler step failed ({type(err).__name__}: {err}); every running request ended and the "
                    "KV cache was reset")
                log.error("%s", failure, exc_info=err)
                self.engine.reset()
                self.prefix_cache.forget()
                self._sampling_changed = True
                for request in self.rows:
                    if request is not None:
                        self._end(request, failure)

    # ------------------------------------------------------------------------------ internals

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for request in gone + [r for r in self.rows if r is not None and r.cancelled]:
            self._end(request)

    def _admit(self) -> None:
        if self.engine.steps_run != self._steps_seen:  # someone else ran steps on the engine: the records may lie
            self.prefix_cache.forget()
        copies = []
        with self._lock:
            while self.waiting and None in self.rows:
                request = self.waiting.popleft()
                free = [row for row, r in enumerate(self.rows) if r is None]
                busy = [row for row, r in enumerate(self.rows) if r is not None]
                place = self.prefix_cache.place(request.prompt, free, busy, request.recordable)
                request.row, request.prefilled = place.row, place.reuse
                request.events.cached_tokens = place.reuse
                request.admitted = next(self._admissions)
                self.rows[request.row] = request
                self._sampling_changed = True
                if place.source is not None:
                    copies.append(place)
        for place in copies:  # in admission order: a later request may copy from a row an earlier copy filled
            self._device("copy_row", src=place.source, dst=place.row)

    def _device(self, op: str, **kwargs: Any) -> StepTokens | None:
        """Run an engine step and bring its tokens to the host (one transfer; their logprobs only when a request
        asked for them). Any failure here is the device's: StepFailed."""
        try:
            out = self.call(op, **kwargs)
            self._steps_seen = self.engine.steps_run
            if out is None:
                return None
            if kwargs.get("targets") is not None:  # a scoring chunk: (the tokens, every position's scores)
                out, scores = out
                return self._host(out, kwargs), StepTokens(*(np.asarray(a) for a in scores))
            return self._host(out, kwargs)
        except Exception as err:
            raise StepFailed(f"the device step ({op}) failed: {type(err).__name__}: {err}; every running request "
                             "ended and the KV cache was reset") from err

    @staticmethod
    def _host(out: StepTokens, kwargs: dict[str, Any]) -> StepTokens:
        if kwargs.get("logprobs"):
            return StepTokens(*(np.asarray(a) for a in out))
        return StepTokens(np.asarray(out.token), None, None, None)

    def _guarded(self, request: Request, work: Callable[[], None]) -> None:
        """Run host-side work of one request; an exception in it ends that request alone, with the exception."""
        try:
            work()
        except Exception as err:
            self._fail(request, err)

    def _fail(self, request: Request, error: Exception) -> None:
        log.error("a request ended with an error of its own (the others go on): %s: %s", type(error).__name__, error)
        self._end(request, error)

    def _prefill(self, request: Request) -> None:
        n, start = len(request.prompt), request.prefilled
        chunk = request.prompt[start: start + self.engine.chunk_size]
        last = start + len(chunk) == n
        try:
            allowed = request.constraint.mask() if last and request.constraint else None
        except Exception as err:
            self._fail(request, err)
            return
        scoring = request.scores_chunk(start, len(chunk))
        targets = {"targets": request.prompt[start + 1: start + len(chunk) + 1]} if scoring else {}
        out = self._device("prefill", row=request.row, tokens=chunk, start=start, length=n,
                           logprobs=request.sampling.logprobs is not None, allowed=allowed, **targets)
        if scoring:
            out, scores = out
            self._guarded(request, lambda: self._keep_scores(request, scores, start, len(chunk)))
        request.prefilled = start + len(chunk)
        recorded = request.prefilled if request.recordable is None else min(request.prefilled, request.recordable)
        self.prefix_cache.prefilled(request.row, request.prompt, recorded)
        if request.decoding:
            self.prompt_tokens += n
            self.cached_tokens += request.cached
            request.position = n
            if request.sampling.max_new_tokens == 0:  # the prompt was all it asked for: no token is taken
                self._guarded(request, lambda: self._deliver_nothing(request))
                return

            def first_token() -> None:
                if request.constraint is not None:
                    request.constraint.take(int(out.token[0, 0]))
                self._take(request, out, 0, 0)

            self._guarded(request, first_token)

    @staticmethod
    def _keep_scores(request: Request, scores: StepTokens, start: int, length: int) -> None:
        """The chunk's logprobs of the prompt tokens it predicts that the request scores (scoring.py)."""
        n, top = len(request.prompt), request.sampling.prompt_logprobs
        if request.events.prompt_logprobs is None:
            request.events.prompt_logprobs = [None] * n
        for i in range(max(0, request.score_from - 1 - start), min(length, n - 1 - start)):
            alternatives = zip(scores.top_ids[0, i, :top].tolist(), scores.top_logprob[0, i, :top].tolist(),
                               strict=True)
            request.events.prompt_logprobs[start + i + 1] = Logprobs(float(scores.logprob[0, i]),
                                                                     tuple(alternatives))

    def _deliver_nothing(self, request: Request) -> None:
        event = request.events.empty()
        with self._emitting:
            if not request.cancelled:  # cancelled while this step ran: nothing more reaches it
                request.emit(event)
        self._end(request)

    def _decode(self) -> None:
        active = [r is not None and r.decoding for r in self.rows]
        requests = [r if a else None for r, a in zip(self.rows, active, strict=True)]
        logprobs = any(r is not None and r.sampling.logprobs is not None for r in requests)
        if self.speculator is not None and self._verify(requests, logprobs):
            return
        constraints = [r.constraint if r is not None else None for r in requests]
        constrained = any(c is not None for c in constraints)
        self.engine.grammar.begin(constraints)  # the block hands them its tokens, and they give the next masks
        out = self._device(
            "decode", positions=[r.position if r else 0 for r in requests], active=active, logprobs=logprobs,
            **first_step(constraints), constrained=constrained)
        failures = self.engine.grammar.failures  # {row: (step, error)}: a grammar that raised, inside the block
        for b, request in enumerate(requests):
            if request is not None:
                self._guarded(request, lambda b=b, request=request: self._deliver(request, out, b, failures.get(b)))
                request.position += out.token.shape[0]

    def _verify(self, requests: list[Request | None], logprobs: bool) -> bool:
        """A verify step of every decoding row with its draft, where some row has one (speculative.py), mostly followed
        by decode steps of every row (SpeculativeEngine.tail); False where no row drafts (the caller runs a decode
        block). A constrained row makes its one token under its mask, and its constraint takes it here."""
        # A constrained row drafts nothing: its next mask depends on each token taken.
        rooms = [0 if r is None or r.constraint else r.events.limit - r.events.count - 1 for r in requests]
        drafts = self.speculator.drafts(requests, rooms)
        if drafts is None:
            return False
        constraints = [r.constraint if r is not None else None for r in requests]
        active = [r is not None for r in requests]
        tail = self.engine.tail(drafts, active, any(c is not None for c in constraints))
        out = self._device("verify", positions=[r.position if r else 0 for r in requests], active=active,
                           drafts=drafts, logprobs=logprobs, tail=tail, **first_step(constraints))
        for b, request in enumerate(requests):
            if request is None:
                continue
            kept = np.flatnonzero(out.token[:, b] != UNKEPT)  # the verify round's kept run, then the decode steps
            if drafts[b]:
                self.speculator.record(request, len(drafts[b]), len(kept) - 1 - tail)
            self._guarded(request, lambda b=b, request=request, kept=kept: self._deliver_kept(request, out, b, kept))
            request.position += len(kept)
        return True

    def _deliver_kept(self, request: Request, out: StepTokens, col: int, kept: np.ndarray) -> None:
        for step in kept:
            if request.finished or request.cancelled:
                return
            if request.constraint is not None:
                request.constraint.take(int(out.token[step, col]))
            self._take(request, out, int(step), col)

    def _deliver(self, request: Request, out: StepTokens, col: int, failure: tuple[int, Exception] | None) -> None:
        """Deliver the request's tokens of a decode block, up to the step its grammar failed at, if it did."""
        for step in range(out.token.shape[0]):
            if request.finished or request.cancelled:
                return
            if failure is not None and step == failure[0]:
                raise failure[1]
            self._take(request, out, step, col)

    def _take(self, request: Request, out: StepTokens, step: int, col: int) -> None:
        """Deliver the request's token of `step` (its constraint has taken it already)."""
        token = int(out.token[step, col])
        refused, complete = request.constraint.taken() if request.constraint is not None else (None, False)
        if token < 0:
            self._end(request, SamplingError("the model produced NaN logits; the weights or inputs are broken"))
            return
        if refused is not None:
            self._end(request, SamplingError(f"the constraint refused a token sampled under its own mask ({refused})"))
            return
        n = request.sampling.logprobs
        logprobs = None if n is None else Logprobs(float(out.logprob[step, col]), tuple(
            (int(i), float(p)) for i, p in zip(out.top_ids[step, col, :n], out.top_logprob[step, col, :n],
                                               strict=True)))
        self.generated_tokens += 1
        request.output.append(token)
        event = request.events.push(token, logprobs, complete=complete)
        with self._emitting:
            if request.cancelled:  # cancelled while this step ran: nothing more reaches it
                return
            request.emit(event)
        if event.finish_reason is not None:
            self._end(request)

    def _end(self, request: Request, error: BaseException | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        if request.row is not None and self.rows[request.row] is request:
            self.rows[request.row] = None
            self.prefix_cache.free(request.row)
        try:
            if error is not None:
                request.emit(error)
            request.emit(None)
        except Exception:  # its consumer's failure is no other request's business
            log.exception("a request's emitter failed while it ended")
