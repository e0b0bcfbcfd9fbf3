"""OpenAI's response objects for one request: chat.completion and text_completion, their streamed chunks, finish
reasons, logprobs and usage."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

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
        logprobs = self._logprobs([event]) if event is not None and event.logprobs is not None else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out = self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}
        return out | ({"usage": None} if include_usage else {})

    def usage_chunk(self, usage) -> dict[str, Any]:
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [], "usage": usage_object(usage)}

    def whole(self, events: list[Event]) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        last = events[-1]
        logprobs = self._logprobs(events) if last.logprobs is not None else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(last.finish_reason, 0),
                                  "logprobs": logprobs}
        if self.chat:
            choice["message"], calls = self.message(text)
            choice["finish_reason"] = self.finish_reason(last.finish_reason, calls)
        else:
            choice["text"] = text
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": [choice], "usage": usage_object(last.usage)}

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"<{token}>"

    def _logprobs(self, events: list[Event]) -> dict[str, Any]:
        """Chat's logprobs.content list, or the completions API's parallel lists."""
        if self.chat:
            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = self._token(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [entry(e.token_id, e.logprobs.logprob)
                                | {"top_logprobs": [entry(t, p) for t, p in e.logprobs.top]} for e in events]}
        return {"tokens": [self._token(e.token_id) for e in events],
                "token_logprobs": [e.logprobs.logprob for e in events],
                "top_logprobs": [{self._token(t): p for t, p in e.logprobs.top} for e in events]}


def usage_object(usage) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: the prompt tokens whose KV came from the prefix cache (0 with it off)."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
