"""Tool calls in a Qwen3 reply, parsed into OpenAI's tool_calls: each well-formed <tool_call> block of the content
becomes a `ToolCall`, in Qwen3's JSON form

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

or in Qwen3-Coder's XML form:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

`ToolCallSplitter` works on a stream of text deltas (reply.py feeds it the content after any thinking block): it
holds back a tail that may be the start of a tag cut across tokens, and a whole reply is one delta with
final=True, so streamed and whole replies split alike. The grammars that make a reply take this form are
grammars.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

from qwen3moe_jax.runtime.text_stream import split_partial

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: OpenAI's id (call_...), the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a call as OpenAI streams it: the call's first delta carries its id and name (`call`, with
    arguments ""), the later ones fragments of its arguments text, which joined are the call's arguments."""

    index: int
    arguments: str = ""
    call: ToolCall | None = None  # the head: set on the call's first delta only

    def openai(self) -> dict[str, Any]:
        if self.call is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, **ToolCall(self.call.name, self.arguments, self.call.id).openai()}


def joined(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls that `deltas` stream (a whole reply's)."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = delta.call or calls[delta.index]  # a head's arguments are ""
        calls[delta.index] = dataclasses.replace(call, arguments=call.arguments + delta.arguments)
    return [calls[i] for i in sorted(calls)]


# The start of a call's body up to its arguments, as Qwen3 writes it (and the forcing grammar makes it write).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"arguments"\s*:\s*')


def _arguments_end(rest: str) -> int:
    """Where the arguments end in `rest`, the body after the head: before the body's closing brace and the
    whitespace around it (the block's end, or as far as it was written)."""
    text = rest.rstrip()
    return len(text[:-1].rstrip()) if text.endswith("}") else len(text)


def parse_tool_call(body: str, tools: Mapping[str, dict[str, Any] | None] | None = None) -> ToolCall | None:
    """The call a <tool_call> block's body holds, in Qwen3's JSON form or Qwen3-Coder's XML form
    (`parse_xml_call`), of one of `tools` (name: its parameters schema; None: any name); None if it holds
    anything else. A JSON call's arguments are their text as written when the body has Qwen3's form (as a
    streamed call sends them), else the object as json.dumps writes it."""
    if body.lstrip().startswith("<function="):
        return parse_xml_call(body, tools)
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict) or (tools is not None and value["name"] not in tools):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    if head := _HEAD.match(body):
        rest = body[head.end():]
        written = rest[:_arguments_end(rest)]
        try:
            if json.loads(written) == arguments:  # not so with keys after the arguments
                text = written
        except ValueError:
            pass
    return ToolCall(value["name"], text)


def parameters_validator(schema: dict[str, Any] | None) -> Any:
    """A jsonschema validator of a tool's arguments by its `parameters` schema (None: any object); ValueError
    if the schema is not one. Kept for the schema's next use: a request checks its tools once to refuse a bad
    one and once more to parse the reply, and an agent sends the same tools with every turn."""
    return _validator(json.dumps({"type": "object"} if schema is None else schema, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str) -> Any:
    schema = json.loads(schema_text)
    if not isinstance(schema.get("$schema", ""), str):
        raise ValueError("parameters is not a JSON schema: its $schema is not a URI")
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(f"parameters is not a JSON schema: {err.message}") from err
    return validator(schema)


# Qwen3-Coder's form of a call's body: <function=NAME>, each argument as <parameter=NAME>\nVALUE\n</parameter>
# (newlines between them), then </function>.
_XML_CALL = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
_XML_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
TEXT_TYPES = (None, "string")  # no type given: the text is the value, as vLLM's qwen3_coder parser takes it


def parse_xml_call(body: str, tools: Mapping[str, dict[str, Any] | None] | None = None) -> ToolCall | None:
    """The call of a body in Qwen3-Coder's XML form, of one of `tools` (None: any name); None if it is not
    one. Each value is the text between its tags less one newline at each end; it stays that text where the
    tool's schema types the parameter as a string (or not at all), and is read as JSON otherwise (an integer,
    object, null...), staying text if it is not JSON, so that the schema check refuses it. Arguments are
    written as json.dumps writes them."""
    call = _XML_CALL.fullmatch(body)
    if call is None or (tools is not None and call[1] not in tools):
        return None
    properties = ((tools or {}).get(call[1]) or {}).get("properties", {})
    arguments: dict[str, Any] = {}
    at, inner = 0, call[2]
    while parameter := _XML_PARAMETER.match(inner, at):
        name, value = parameter[1], parameter[2].removeprefix("\n").removesuffix("\n")
        if name in arguments:  # said twice: not a call we can read one way
            return None
        schema = properties.get(name)
        types = schema.get("type") if isinstance(schema, dict) else None
        if not any(t in TEXT_TYPES for t in (types if isinstance(types, list) else [types])):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        arguments[name], at = value, parameter.end()
    if inner[at:].strip():  # anything but parameters
        return None
    return ToolCall(call[1], json.dumps(arguments, ensure_ascii=False))


class ToolCallSplitter:
    """Splits content into (text, tool call deltas). Each <tool_call>…</tool_call> block that holds a
    well-formed call of one of `tools` (name: its parameters schema, None for any object) whose arguments
    validate against that schema becomes a ToolCall; any other block stays text, as written, and so does a
    block still open when the reply ends. Whitespace before a call is dropped (Qwen3 puts a newline there), so
    a reply of calls alone has no text.

    A call whose arguments the schema refuses stays text (vLLM returns it as a call and leaves the check to
    the client): the tools' schemas are the contract the client declared, a call that breaks it cannot be run
    as it is, and the text shows what the model wrote. Calls that tool_choice demands always fit (the grammar
    writes them).

    When does a call go out? With `stream_arguments` (decoding is constrained to calls, so every block is one),
    once its head `{"name": ..., "arguments": ` has come with one of the names: its first delta then, and its
    arguments text as it comes. Otherwise once its block has closed and parsed: a block cannot be known to be a
    call before that, and one that is not must reach the text whole, with no half call sent before. (vLLM's
    parsers stream every block that starts like a call and cannot take back one that goes wrong.) A streamed
    call whose reply ends first (max_tokens, a stop string) keeps the arguments written so far, as OpenAI's do."""

    def __init__(self, tools: Mapping[str, dict[str, Any] | None] | None = None,
                 stream_arguments: bool = False) -> None:
        self.tools = tools
        self.validators = {name: parameters_validator(schema) for name, schema in (tools or {}).items()}
        self.stream_arguments = stream_arguments
        self.pending = ""
        self.inside = False
        self.gap = ""  # the whitespace before the open block: dropped if it is a call, kept if not
        self.calls = 0
        self.sent: int | None = None  # for a streamed call in its block: the arguments text sent so far

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.pending += text
        out, deltas = "", []
        while True:
            if self.inside and self.sent is not None:  # a streamed call: the arguments so far
                end = self.pending.find(CALL_CLOSE)
                rest = self.pending if end < 0 else self.pending[:end]
                # Held back: the body's closing brace, and a possible partial </tool_call>, with their whitespace.
                cut = _arguments_end(rest if end >= 0 else split_partial(rest, [CALL_CLOSE])[0])
                if cut > self.sent:
                    deltas.append(ToolCallDelta(self.calls, rest[self.sent:cut]))
                    self.sent = cut
                if end < 0:
                    if final:
                        self.pending, self.calls = "", self.calls + 1
                    return out, deltas
                self.pending, self.inside, self.sent = self.pending[end + len(CALL_CLOSE):], False, None
                self.calls += 1
                continue
            if self.inside:
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    head = _HEAD.match(self.pending) if self.stream_arguments else None
                    # The head is complete when the arguments' first character has come after it.
                    if head and head.end() < len(self.pending) and (self.tools is None or head[1] in self.tools):
                        deltas.append(ToolCallDelta(self.calls, call=ToolCall(head[1], "")))
                        self.pending, self.sent = self.pending[head.end():], 0
                        continue
                    if final:
                        out, self.pending = out + self.gap + CALL_OPEN + self.pending, ""
                    return out, deltas
                body, self.pending = self.pending[:end], self.pending[end + len(CALL_CLOSE):]
                self.inside = False
                if (call := parse_tool_call(body, self.tools)) is not None and self._fits(call):
                    deltas += [ToolCallDelta(self.calls, call=dataclasses.replace(call, arguments="")),
                               ToolCallDelta(self.calls, call.arguments)]
                    self.calls += 1
                else:
                    out += self.gap + CALL_OPEN + body + CALL_CLOSE
                continue
            start = self.pending.find(CALL_OPEN)
            if start >= 0:
                text = self.pending[:start].rstrip()
                out, self.gap = out + text, self.pending[len(text):start]
                self.pending, self.inside = self.pending[start + len(CALL_OPEN):], True
                continue
            if final:
                tail = self.pending.rstrip() if self.calls else self.pending
                return out + tail, deltas
            # Hold back a possible partial <tool_call>, and the whitespace before it.
            shown, self.pending = split_partial(self.pending, [CALL_OPEN], strip=None)
            return out + shown, deltas

    def _fits(self, call: ToolCall) -> bool:
        """Whether the call's arguments validate against its tool's parameters schema (not if the schema
        needs a $ref it cannot resolve: no schema is fetched)."""
        validator = self.validators.get(call.name)
        try:
            return validator is None or validator.is_valid(json.loads(call.arguments))
        except Unresolvable:
            return False
