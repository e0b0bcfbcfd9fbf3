"""Evaluation on the scheduler's rows: the log-likelihood of a continuation given a context (`Score`), many at a time
with shared contexts computed once (`run_sharing_prefixes`), and perplexity over windows of a long text as
llama.cpp's `llama-perplexity` computes it (`perplexity_windows`, `Perplexity`).

Every score comes from a request that asks for its prompt's logprobs (SamplingParams.prompt_logprobs) from a first
scored position on, and for no new token (max_new_tokens=0): its prompt chunks from the one holding that position's
predecessor on are scoring chunks (scoring.py), which project every position through lm_head; the chunks before it
are plain prefill chunks, which the prefix cache may take from a row that holds them (prefix_cache.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence

from qwen3moe_jax.errors import ContextLengthError, Qwen3MoeError
from qwen3moe_jax.runtime.generation import Event, PromptLogprobs
from qwen3moe_jax.runtime.scheduler import Request, Scheduler


@dataclasses.dataclass(frozen=True)
class Score:
    """The log-likelihood of a continuation given its context: its total log-probability (natural log), each of its
    tokens' logprobs, whether every one of its tokens was the model's most likely (greedy: the continuation is what
    greedy decoding writes), and its token ids."""

    logprob: float
    token_logprobs: list[float]
    greedy: bool
    tokens: list[int]

    @classmethod
    def of(cls, prompt: Sequence[int], first: int, scores: PromptLogprobs) -> Score:
        """The score of prompt[first:] from a request's prompt logprobs (at least one alternative each)."""
        scored = scores[first:]
        logprobs = [s.logprob for s in scored]
        # The token's logprob and the top one come from the same array: equal exactly when it is the argmax.
        greedy = all(s.logprob >= s.top[0][1] for s in scored)
        return cls(math.fsum(logprobs), logprobs, greedy, list(prompt[first:]))


def run_sharing_prefixes(scheduler: Scheduler, requests: Sequence[Request],
                         on_done: Callable[[int, list[Event]], None] | None = None) -> list[list[Event]]:
    """Run every request and return their events, in order, as Scheduler.run_all does, with at most the scheduler's
    rows in flight, and each request that shares the prefix its prefix cache may reuse (whole chunks) with an earlier
    one held back until that one has prefilled it: the shared chunks are computed once and copied, not computed by
    requests admitted together. on_done(i, its events) is called as request i ends."""
    C = scheduler.engine.chunk_size
    keys = []
    for r in requests:
        limit = len(r.prompt) - 1 if r.recordable is None else min(r.recordable, len(r.prompt) - 1)
        keys.append(tuple(r.prompt[: limit // C * C]))
    leader: dict[tuple[int, ...], int] = {}
    waits_for = [leader.setdefault(key, i) if key else i for i, key in enumerate(keys)]
    boxes: list[list] = [[] for _ in requests]
    pending = collections.deque(range(len(requests)))
    running: set[int] = set()
    rows = scheduler.engine.batch_size
    while pending or running:
        for i in list(pending):
            if len(running) >= rows:
                break
            first = requests[waits_for[i]]
            if waits_for[i] != i and not (first.finished or first.prefilled >= len(keys[i])):
                continue  # its prefix is being computed: the next step copies it
            requests[i].emit = boxes[i].append
            scheduler.submit(requests[i])
            pending.remove(i)
            running.add(i)
        scheduler.step()
        for i in [i for i in running if requests[i].finished]:
            running.remove(i)
            if on_done is not None:
                on_done(i, boxes[i])
    for box in boxes:
        for item in box:
            if isinstance(item, BaseException):
                raise item
    return [[e for e in box if e is not None] for box in boxes]


def perplexity_windows(n_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int]]:
    """The windows llama.cpp's llama-perplexity scores over n_tokens tokens, as (start, first scored position in the
    window): without a stride, consecutive windows of `context` tokens, each scored from its middle on (the tokens
    after position context // 2, so that each has at least half a window before it); with one (llama.cpp's
    --ppl-stride), windows starting every `stride` tokens, each scoring its last `stride` tokens."""
    if context < 2:
        raise Qwen3MoeError(f"the perplexity context must be at least 2 tokens, got {context}")
    if stride is None:
        count, step, first = n_tokens // context, context, context // 2 + 1
    else:
        if not 1 <= stride < context:
            raise Qwen3MoeError(f"the stride must be in 1..{context - 1} (below the context), got {stride}")
        count, step, first = -(-(n_tokens - context) // stride), stride, context - stride
    if count < 1:
        raise ContextLengthError(f"the text is {n_tokens} tokens, too short for one window of {context} tokens"
                                 + (f" and a stride of {stride}" if stride is not None else ""))
    return [(i * step, first) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """exp of the mean negative log-likelihood (nats) over the scored tokens, with llama.cpp's estimate of its
    standard error (from the spread of the per-token values), and what was scored."""

    perplexity: float
    nll: float
    stderr: float
    tokens: int
    windows: int
    context: int
    stride: int | None

    @classmethod
    def of(cls, nlls: Sequence[float], windows: int, context: int, stride: int | None) -> Perplexity:
        n = len(nlls)
        mean = math.fsum(nlls) / n
        variance = math.fsum(v * v for v in nlls) / n - mean * mean
        stderr = math.sqrt(variance / (n - 1)) * math.exp(mean) if n > 1 and variance > 0 else math.nan
        return cls(math.exp(mean), mean, stderr, n, windows, context, stride)
