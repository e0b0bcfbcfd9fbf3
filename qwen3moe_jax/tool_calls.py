"""Qwen3's reply format, parsed into OpenAI's message fields, and the grammars that make a reply take it.

A Qwen3 reply may open with a thinking block and may end in tool calls:

    <think>
    The user wants the weather.
    </think>

    Let me look it up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ReasoningSplitter` sends the thinking to `reasoning_content` and the rest to `content` (as vLLM's qwen3
reasoning parser does); `ToolCallSplitter` takes each well-formed <tool_call> block out of the content as
a `ToolCall`, in that JSON form or in Qwen3-Coder's XML form:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Both work on a stream of text deltas: they hold back a tail that may be the start of a tag cut
across tokens, and a whole reply is one delta with final=True, so streamed and whole replies split alike.

`tool_call_grammar` and `json_grammar` are Lark grammars in llguidance's syntax (SamplingParams(grammar=...))
that constrain decoding to tool calls of the given tools, or to JSON of a schema, optionally after a
thinking block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

from qwen3moe_jax.constraints import JSON_STYLE

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (a tag cut across deltas)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the prompt leaves a thinking block open, so the reply starts inside it (Qwen3's thinking-only
    templates end the prompt with "<think>\\n"; the reply then carries only </think>)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ReasoningSplitter:
    """Splits a reply into (reasoning, content) deltas. The reasoning is the text of a thinking block that
    opens the reply (leading whitespace allowed) or that the prompt opened (`opened`), without the newlines
    around it; the content is what follows </think>, without its leading whitespace. A reply that does not
    open with <think> is all content. A block that never closes is all reasoning."""

    def __init__(self, opened: bool = False) -> None:
        self.state = "reasoning_start" if opened else "start"
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The (reasoning, content) that `text` completes; final=True flushes everything held back."""
        self.pending += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending, self.state = head[len(THINK_OPEN):], "reasoning_start"
                elif THINK_OPEN.startswith(head) and not final:  # nothing but (the start of) <think> yet
                    return reasoning, content
                else:
                    self.state = "content"
            elif self.state == "reasoning_start":  # the newline after <think>
                self.pending = self.pending.lstrip("\n")
                if not self.pending and not final:
                    return reasoning, content
                self.state = "reasoning"
            elif self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end].rstrip("\n")
                    self.pending, self.state = self.pending[end + len(THINK_CLOSE):], "content_start"
                    continue
                if final:
                    reasoning, self.pending = reasoning + self.pending.rstrip("\n"), ""
                    return reasoning, content
                # Hold back a possible partial </think> and the newlines before it (dropped if it comes).
                keep = _partial_tag_length(self.pending, THINK_CLOSE)
                body = self.pending[:len(self.pending) - keep]
                keep += len(body) - len(body.rstrip("\n"))
                cut = len(self.pending) - keep
                reasoning, self.pending = reasoning + self.pending[:cut], self.pending[cut:]
                return reasoning, content
            elif self.state == "content_start":  # the blank line after </think>
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return reasoning, content
                self.state = "content"
            else:
                content, self.pending = content + self.pending, ""
                return reasoning, content


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
_TEXT_TYPES = (None, "string")  # no type given: the text is the value, as vLLM's qwen3_coder parser takes it


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
        if not any(t in _TEXT_TYPES for t in (types if isinstance(types, list) else [types])):
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
    as it is, and the text shows what the model wrote. Forced calls always fit (the grammar writes them).

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
                cut = _arguments_end(rest if end >= 0 else rest[:len(rest) - _partial_tag_length(rest, CALL_CLOSE)])
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
            keep = _partial_tag_length(self.pending, CALL_OPEN)
            body = self.pending[:len(self.pending) - keep]
            cut = len(body.rstrip())
            out, self.pending = out + self.pending[:cut], self.pending[cut:]
            return out, deltas

    def _fits(self, call: ToolCall) -> bool:
        """Whether the call's arguments validate against its tool's parameters schema (not if the schema
        needs a $ref it cannot resolve: no schema is fetched)."""
        validator = self.validators.get(call.name)
        try:
            return validator is None or validator.is_valid(json.loads(call.arguments))
        except Unresolvable:
            return False


# ------------------------------------------------------------------------------------------- grammars

def _tag(tag: str, has_token: Callable[[str], bool]) -> str:
    """A tag in llguidance's Lark: the tokenizer's own token for it (llguidance matches added tokens only by
    that syntax), or else its text."""
    return tag if has_token(tag) else json.dumps(tag)


@dataclasses.dataclass(frozen=True)
class Thinking:
    """A thinking block before a constrained structure: `opened` when the prompt opened it (the reply must
    close it), else the reply may open one; at most `max_tokens` tokens of it, after which the grammar lets
    only </think> come, so the structure still gets the rest of the reply's tokens (a model that never
    closes its thinking, like the bundled one, would otherwise spend them all)."""

    opened: bool
    max_tokens: int


def _thinking_prefix(thinking: Thinking | None, has_token: Callable[[str], bool]) -> tuple[str, str]:
    """(the start rule's prefix, extra rules) for the thinking block, if any."""
    if thinking is None:
        return "", ""
    rules = (f"think_text[max_tokens={max(1, thinking.max_tokens)}]: /(.|\\n)*/\n"
             f"think_end: {_tag(THINK_CLOSE, has_token)} /\\n{{0,2}}/\n")  # Qwen3 leaves a blank line; no padding
    if thinking.opened:
        return "think_text think_end ", rules
    return "think? ", rules + f"think: {_tag(THINK_OPEN, has_token)} think_text think_end\n"


def _json(schema: dict[str, Any]) -> str:
    """A schema embedded in Lark, in JSON_STYLE (unless the schema's own x-guidance says otherwise)."""
    return "%json" + json.dumps({"x-guidance": JSON_STYLE} | schema)


def json_grammar(schema: dict[str, Any], thinking: Thinking | None, has_token: Callable[[str], bool]) -> str:
    """JSON of `schema`, after a thinking block when `thinking` asks for one."""
    prefix, rules = _thinking_prefix(thinking, has_token)
    return f"start: {prefix}{_json(schema)}\n{rules}"


# What a schema may say for the XML form to write it: the rest (a pattern, minLength, anyOf, $ref...) the
# grammar cannot keep to in raw text, so such a tool's calls are written in the JSON form.
_NOTES = {"description", "title", "default", "examples"}
_XML_OBJECT = _NOTES | {"type", "properties", "required", "additionalProperties", "$schema"}
_XML_TEXT = _NOTES | {"type", "enum", "maxLength"}


def _xml_parameter(rule: str, key: str, schema: Any) -> list[str] | None:
    """The Lark rules of one parameter in the XML form, or None if the form cannot keep to its schema. Text
    (a string, or no type) is written as it is, up to </parameter>, as parse_xml_call reads it (one newline
    at each end is not part of it, so maxLength bounds the text with them); any other type is JSON (whose
    strings could still hold "</parameter>", which would end the value early: a call that then stays text)."""
    if not isinstance(schema, dict) or not re.fullmatch(r"[^>\n]+", key):
        return None
    opening = json.dumps(f"<parameter={key}>\n")
    types = schema.get("type")
    if types not in _TEXT_TYPES and not (isinstance(types, list) and "string" in types):
        return [f'{rule}: {opening} {_json(schema)} "\\n</parameter>\\n"']
    if not set(schema) <= _XML_TEXT:
        return None
    if "enum" in schema:
        if not all(isinstance(value, str) and "</parameter>" not in value for value in schema["enum"]):
            return None
        choices = " | ".join(json.dumps(value) for value in schema["enum"])
        return [f'{rule}: {opening} ({choices}) "\\n</parameter>\\n"']
    bound = f"{{0,{schema['maxLength']}}}" if "maxLength" in schema else "*"
    # A lazy lexeme: the text ends at the first </parameter>, which the suffix then writes.
    return [f"{rule}: {opening} {rule}_text", f'{rule}_text[suffix="</parameter>\\n"]: /(.|\\n){bound}/']


def _xml_function(i: int, tool: dict[str, Any]) -> list[str] | None:
    """The Lark rules of a call of `tool` (rule fn{i}) in Qwen3-Coder's XML form, or None if the form cannot
    keep to the tool's parameters schema: the parameters in the schema's order, the required ones always, no
    others."""
    schema = tool.get("parameters")
    if not isinstance(schema, dict) or schema.get("type") != "object" or not set(schema) <= _XML_OBJECT:
        return None
    properties, required = schema.get("properties", {}), set(schema.get("required", []))
    if not required <= set(properties):
        return None
    rules, parts = [], []
    for j, (key, prop) in enumerate(properties.items()):
        if (parameter := _xml_parameter(f"fn{i}_{j}", key, prop)) is None:
            return None
        rules += parameter
        parts.append(f"fn{i}_{j}" + ("" if key in required else "?"))
    head = json.dumps(f"<function={tool['name']}>\n")
    return [f"fn{i}: {head} {' '.join(parts)} \"</function>\"", *rules]


def tool_call_grammar(tools: Sequence[dict[str, Any]], several: bool, thinking: Thinking | None,
                      has_token: Callable[[str], bool], xml: bool = False) -> str:
    """One <tool_call> (several: one or more, a newline apart) of one of `tools` (OpenAI's function
    objects: name, parameters), its arguments valid JSON of that tool's parameters schema, after a thinking
    block when `thinking` asks for one. With `xml` (a Qwen3-Coder template), in Qwen3-Coder's XML form where
    that form can keep to the tool's schema (`_xml_function`), else in the JSON form."""
    prefix, rules = _thinking_prefix(thinking, has_token)
    calls = "call (\"\\n\" call)*" if several else "call"
    alternatives = " | ".join(f"fn{i}" for i in range(len(tools)))
    lines = [f"start: {prefix}{calls}",
             f"call: {_tag(CALL_OPEN, has_token)} \"\\n\" ({alternatives}) \"\\n\" {_tag(CALL_CLOSE, has_token)}"]
    for i, tool in enumerate(tools):
        if xml and (form := _xml_function(i, tool)) is not None:
            lines += form
            continue
        head = json.dumps(f'{{"name": {json.dumps(tool["name"])}, "arguments": ')
        schema = tool.get("parameters") or {"type": "object"}
        lines.append(f"fn{i}: {head} {_json(schema)} \"}}\"")
    return "\n".join(lines) + "\n" + rules


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
