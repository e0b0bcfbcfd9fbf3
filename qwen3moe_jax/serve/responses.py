"""OpenAI's response objects for one request: chat.completion and text_completion, their streamed chunks, finish
reasons, logprobs and usage."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from qwen3moe_jax.io.tokenizer import TextDecoder
from qwen3moe_jax.runtime.generation import Event
from qwen3moe_jax.serve.reply import ReplyFormat, ReplyParser
from qwen3moe_jax.serve.tool_calls import joined

FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "grammar_complete": "stop",
                  "max_new_tokens": "length", "cache_full": "length"}


@dataclasses.dataclass
class ResponseShape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    tokenizer: Any
    reply: ReplyFormat = dataclasses.field(default_factory=ReplyFormat)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    logprobs: bool = False  # the request asked for logprobs
    streamed: int = 0  # completions: the characters of text streamed so far (where the next token's text starts)

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def parser(self) -> ReplyParser:
        return ReplyParser.of(self.reply)

    @staticmethod
    def finish_reason(reason: str | None, calls: int) -> str:
        finish = FINISH_REASONS.get(reason, "stop")
        return "tool_calls" if calls and finish == "stop" else finish

    def message(self, text: str) -> tuple[dict[str, Any], int]:
        """The chat message of a whole reply, and how many tool calls it holds."""
        reasoning, content, call_deltas = self.parser().feed(text, final=True)
        calls = joined(call_deltas)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if reasoning or calls else "")}
        if self.reply.reasoning:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        return message, len(calls)

    def chunk(self, delta, finish_reason: str | None, include_usage: bool,
              event: Event | None = None) -> dict[str, Any]:
        logprobs = self._logprobs([event], self.streamed) if event is not None and event.logprobs is not None \
            else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
            self.streamed += len(delta)
        out = self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}
        return out | ({"usage": None} if include_usage else {})

    def echo_chunk(self, prompt: list[int], event: Event, include_usage: bool) -> dict[str, Any]:
        """A completion stream's first chunk when it echoes the prompt: its text, and its logprobs if asked."""
        text, offsets = self.offsets(prompt)
        scores = event.prompt_logprobs or [None] * len(prompt)
        logprobs = self.echoed(prompt, scores, offsets, None) if self.logprobs else None
        self.streamed = len(text)
        return self._head("text_completion") | {
            "choices": [{"index": 0, "finish_reason": None, "logprobs": logprobs, "text": text}]} | (
            {"usage": None} if include_usage else {})

    def usage_chunk(self, usage) -> dict[str, Any]:
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [], "usage": usage_object(usage)}

    def whole(self, events: list[Event], echo: list[int] | None = None) -> dict[str, Any]:
        """The reply of a request's events (with the prompt's tokens when the completion echoes it)."""
        return self.whole_of([events], [echo])

    def whole_of(self, runs: list[list[Event]], echoes: list[list[int] | None]) -> dict[str, Any]:
        """One reply of several requests' events (completions of a list of prompts), a choice each, in order."""
        choices = [self._choice(i, events, echo) for i, (events, echo) in enumerate(zip(runs, echoes, strict=True))]
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": choices, "usage": usage_object(*(events[-1].usage for events in runs))}

    def _choice(self, index: int, events: list[Event], echo: list[int] | None) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        last = events[-1]
        generated = [e for e in events if e.token_id is not None]
        asked = self.logprobs
        choice: dict[str, Any] = {"index": index, "finish_reason": self.finish_reason(last.finish_reason, 0),
                                  "logprobs": self._logprobs(generated) if asked else None}
        if self.chat:
            choice["message"], calls = self.message(text)
            choice["finish_reason"] = self.finish_reason(last.finish_reason, calls)
            return choice
        if echo is not None:
            prompt_text, offsets = self.offsets(echo)
            if asked:
                generated_logprobs = self._logprobs(generated, len(prompt_text))
                choice["logprobs"] = self.echoed(echo, events[0].prompt_logprobs or [None] * len(echo), offsets,
                                                 generated_logprobs)
            text = prompt_text + text
        return choice | {"text": text}

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"<{token}>"

    def _top(self, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
        """The completions API's {token text: logprob}, best first; where two tokens have one text (bytes that are no
        character alone), the likelier one's."""
        out: dict[str, float] = {}
        for token, logprob in top:
            out.setdefault(self._token(token), logprob)
        return out

    def offsets(self, tokens: list[int]) -> tuple[str, list[int]]:
        """The text of tokens and where each token's text starts in it (a character split across tokens belongs
        to the token that completes it)."""
        if self.tokenizer is None:
            names = [self._token(t) for t in tokens]
            return "".join(names), [sum(map(len, names[:i])) for i in range(len(names))]
        decoder, offsets, text = TextDecoder(self.tokenizer), [], ""
        for token in tokens:
            offsets.append(len(text))
            text += decoder.step(token)
        return text + decoder.finish(), offsets

    def echoed(self, prompt: list[int], scores: list, offsets: list[int], generated: dict | None) -> dict[str, Any]:
        """The completions API's logprobs of an echoed prompt (null for the first token, which nothing predicts)
        followed by the `generated` tokens' (None: none)."""
        echoed = {"tokens": [self._token(t) for t in prompt],
                  "token_logprobs": [s.logprob if s else None for s in scores],
                  "top_logprobs": [self._top(s.top) if s else None for s in scores],
                  "text_offset": offsets}
        return echoed if generated is None else {key: echoed[key] + generated[key] for key in echoed}

    def _logprobs(self, events: list[Event], base: int = 0) -> dict[str, Any]:
        """Chat's logprobs.content list, or the completions API's parallel lists (text_offset: where each token's
        text starts, from `base`)."""
        if self.chat:
            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = self._token(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [entry(e.token_id, e.logprobs.logprob)
                                | {"top_logprobs": [entry(t, p) for t, p in e.logprobs.top]} for e in events]}
        starts = list(itertools.accumulate((len(e.text) for e in events[:-1]), initial=base))[: len(events)]
        return {"tokens": [self._token(e.token_id) for e in events],
                "token_logprobs": [e.logprobs.logprob for e in events],
                "top_logprobs": [self._top(e.logprobs.top) for e in events],
                "text_offset": starts}


def usage_object(*usages) -> dict[str, Any]:
    """OpenAI's usage (of one request, or summed over several); cached_tokens: the prompt tokens whose KV came from
    the prefix cache (0 with it off)."""
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)}}
