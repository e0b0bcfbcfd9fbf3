"""Lark grammars in llguidance's syntax (SamplingParams(grammar=...)) that constrain a chat reply to tool calls of
given tools (`tool_call_grammar`, in the forms tool_calls.py parses), or to JSON of a schema (`json_grammar`),
optionally after a thinking block."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from qwen3moe_jax.runtime.constraints import JSON_STYLE
from qwen3moe_jax.serve.reasoning import THINK_CLOSE, THINK_OPEN
from qwen3moe_jax.serve.tool_calls import CALL_CLOSE, CALL_OPEN, TEXT_TYPES


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
    if types not in TEXT_TYPES and not (isinstance(types, list) and "string" in types):
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
