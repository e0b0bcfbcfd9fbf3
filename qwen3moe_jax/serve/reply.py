"""How a chat reply's text becomes OpenAI's message fields: the thinking block to reasoning_content
(reasoning.py), tool calls to tool_calls (tool_calls.py), the rest to content."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qwen3moe_jax.serve.reasoning import ReasoningSplitter
from qwen3moe_jax.serve.tool_calls import ToolCallDelta, ToolCallSplitter


@dataclasses.dataclass(frozen=True)
class ReplyFormat:
    """How a chat reply is parsed (see ReplyParser): `reasoning`, whether a thinking block goes to
    reasoning_content (thinking is on), and `opened`, whether the prompt opened it; `tools`, the functions
    whose <tool_call> blocks become tool_calls, by name, with their parameters schema (None: no parsing, as
    with tool_choice "none"), and `stream_arguments`, whether decoding is constrained to calls, so that their
    arguments stream as they come."""

    reasoning: bool = False
    opened: bool = False
    tools: dict[str, dict[str, Any] | None] | None = None
    stream_arguments: bool = False


# Each parameter of OpenAI's that the server does not implement, with its values that ask for nothing.


class ReplyParser:
    """A chat reply's text deltas as (reasoning, content, tool call) deltas: the thinking block split off
    when `reasoning`, then tool calls of `tools` (name: parameters schema) taken out of the content (None: no
    tool-call parsing), their arguments streamed as they come when `stream_arguments` (see ToolCallSplitter)."""

    def __init__(self, reasoning: bool, opened: bool, tools: Mapping[str, dict[str, Any] | None] | None,
                 stream_arguments: bool = False) -> None:
        self.thinking = ReasoningSplitter(opened) if reasoning else None
        self.calls = ToolCallSplitter(tools, stream_arguments) if tools is not None else None

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCallDelta]]:
        reasoning, content = self.thinking.feed(text, final) if self.thinking else ("", text)
        content, calls = self.calls.feed(content, final) if self.calls else (content, [])
        return reasoning, content, calls

    @classmethod
    def of(cls, reply: ReplyFormat) -> ReplyParser:
        return cls(reply.reasoning, reply.opened, reply.tools, reply.stream_arguments)
