"""What a request's tokens become (CONTRACTS.md, Streaming): the loop that produces them is the scheduler's
(scheduler.py), shared by the CLI, the server, notebooks and scripts.

`RequestEvents` turns each new token of a request into an `Event`: its id, the text it makes visible,
optional logprobs, and on the last event why generation ended and the usage figures. `collect` gathers a
request's events. `Model.stream` yields them, `Model.complete` collects them and `Model.generate` gives
the token ids of that.

Per token, in this order: the host receives the id, `on_token(id)` is called (returning False ends the
request), then the stop checks run. Finish reasons:
    "eos"             an EOS id of the model (the default stop ids)
    "stop_token"      another id of `stop_token_ids`
    "stop_string"     one of the `stop` strings appeared in the text (it is cut out of the text)
    "grammar_complete" the request's json_schema / regex / grammar is matched and allows nothing more
    "max_new_tokens"  the request's token budget is spent
    "cache_full"      max_new_tokens=None and the KV cache is full
    "cancelled"       on_token returned False
A stop token's event has empty text; closing the iterator ends the request without a final event. A request of
max_new_tokens=0 has one event, with no token (token_id None): its finish reason, usage and prompt logprobs.
A request that asks for prompt_logprobs gets them on its first event: per prompt position, the Logprobs of that
token given the ones before it (None where not computed: the first token, and those before a scoring request's
first scored position).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

from qwen3moe_jax.io.tokenizer import TextDecoder, Tokenizer
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.text_stream import StopStrings

OnToken = Callable[[int], bool | None]


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float  # from the first request for a token to it on the host: prefill (+ compile)
    decode_tokens_per_s: float  # tokens after the first, per second after the first (nan with one token)
    total_s: float
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not computed (scheduler.py)


@dataclasses.dataclass(frozen=True)
class Logprobs:
    """The chosen token's log-probability under the model (before penalty, temperature and filters)
    and the most likely tokens at that step, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


PromptLogprobs = list[Logprobs | None]  # per prompt position (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Event:
    token_id: int | None  # None only on the one event of a request of max_new_tokens=0
    text: str  # the text this token makes visible (may be "" while a character or stop string is pending)
    logprobs: Logprobs | None = None
    finish_reason: str | None = None  # set on the last event only
    usage: Usage | None = None  # set on the last event only
    prompt_logprobs: PromptLogprobs | None = None  # set on the first event only, when asked for


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole request's result, as `collect` gathers it from the events."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[Logprobs] | None
    prompt_logprobs: PromptLogprobs | None = None


class RequestEvents:
    """One request's tokens, as the scheduler receives them, turned into Events: the text each makes visible,
    its logprobs, and on the last one why generation ended and the usage figures (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_len: int, sampling: SamplingParams, limit: int,
                 stop_token_ids: Sequence[int], eos_token_ids: Sequence[int], on_token: OnToken | None = None):
        self.start = time.perf_counter()
        self.prompt_len, self.limit, self.on_token = prompt_len, limit, on_token
        self.out_of_room = "max_new_tokens" if sampling.max_new_tokens is not None else "cache_full"
        self.stop_ids, self.eos_ids = frozenset(stop_token_ids), frozenset(eos_token_ids)
        self.decoder = TextDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(sampling.stop)
        self.count = 0
        self.first_at = math.nan
        self.cached_tokens = 0  # set by the scheduler when it admits the request (prefix_cache.py)
        self.prompt_logprobs: PromptLogprobs | None = None  # filled by the scheduler's scoring chunks

    def _first(self) -> PromptLogprobs | None:
        """The prompt logprobs, for the first event (and only it)."""
        scores, self.prompt_logprobs = self.prompt_logprobs, None
        return scores

    def empty(self) -> Event:
        """The one event of a request that generates nothing (max_new_tokens=0)."""
        now = time.perf_counter()
        self.first_at = now
        usage = Usage(self.prompt_len, 0, now - self.start, math.nan, now - self.start, self.cached_tokens)
        return Event(None, "", None, self.out_of_room, usage, self._first())

    def push(self, token: int, logprobs: Logprobs | None, complete: bool = False) -> Event:
        """The event of the next token; its finish_reason is set when the request ends with it (complete: the
        request's constraint is satisfied and allows nothing more)."""
        now = time.perf_counter()
        self.count += 1
        if self.count == 1:
            self.first_at = now
        keep_going = self.on_token(token) if self.on_token is not None else True

        text, reason = "", None
        if token in self.stop_ids:
            reason = "eos" if token in self.eos_ids else "stop_token"
        elif self.decoder is not None:
            text, hit = self.stops.push(self.decoder.step(token))
            reason = "stop_string" if hit else None
        if reason is None and complete:
            reason = "grammar_complete"
        elif reason is None and keep_going is False:
            reason = "cancelled"
        elif reason is None and self.count == self.limit:
            reason = self.out_of_room
        if reason not in (None, "stop_string") and self.decoder is not None:
            text += self.stops.push(self.decoder.finish())[0] + self.stops.flush()  # held-back bytes, then text

        usage = None
        if reason is not None:
            rate = (self.count - 1) / (now - self.first_at) if self.count > 1 and now > self.first_at else math.nan
            usage = Usage(self.prompt_len, self.count, self.first_at - self.start, rate, now - self.start,
                          self.cached_tokens)
        return Event(token, text, logprobs, reason, usage, self._first() if self.count == 1 else None)


def collect(events: Iterator[Event]) -> Completion:
    """Run a request's events to the end and gather them."""
    ids, texts, logprobs = [], [], []
    last = first = None
    for last in events:
        first = first or last
        if last.token_id is not None:
            ids.append(last.token_id)
            logprobs.append(last.logprobs)
        texts.append(last.text)
    return Completion(
        token_ids=ids, text="".join(texts),
        finish_reason=last.finish_reason if last else None, usage=last.usage if last else None,
        logprobs=logprobs if logprobs and logprobs[0] is not None else None,
        prompt_logprobs=first.prompt_logprobs if first else None,
    )
