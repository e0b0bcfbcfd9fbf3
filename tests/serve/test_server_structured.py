"""Structured output, tool calls and reasoning through the OpenAI API, with the stock `openai` client against
one server on the bundled model. Every structured answer is checked with the `jsonschema` package, at
temperature 1 over several seeds (the bundled model writes Python, never JSON, unless decoding is
constrained: the first test shows it)."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import qwen3moe_jax as qj
from tests.server_process import running_server

MODEL = "qwen3-moe-pystdlib-Q8_0"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
ASK = [{"role": "user", "content": "Describe one function of the standard library."}]
SEEDS = range(3)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "kind": {"enum": ["function", "class", "module"]},
    "lines": {"type": "integer", "minimum": 0, "maximum": 9999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "kind", "lines", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    # Tools are long prompts for the bundled model's tokenizer (about 100 tokens each): a KV cache of 512 tokens
    # leaves room for them and the calls.
    with running_server("--warmup-tokens", "16", "--max-seq-len", "512", preset=None) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _is_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------- response_format

def test_json_schema_answers_validate_at_temperature_1(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=1, seed=0,
                                           extra_body=NO_THINKING)
    assert not _is_json(plain.choices[0].message.content)  # unconstrained, the model writes no JSON
    for seed in SEEDS:
        for extra in (NO_THINKING, {}):  # thinking on: the content, after any thinking block, is the JSON
            reply = client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=150, temperature=1, seed=seed, extra_body=extra,
                response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA,
                                                                        "strict": True}})
            choice = choice_of(reply)
            assert choice.finish_reason == "stop", (seed, extra, choice)
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def choice_of(reply):
    return reply.choices[0]


def test_json_object_answers_are_json_objects(client):
    """{"type": "object"} bounds no key or string, so at temperature 1 the bundled model writes one long key until
    max_tokens; every answer is still the start of an object, and where it ends it is one."""
    for seed in SEEDS:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=1, seed=seed,
                                               response_format={"type": "json_object"}, extra_body=NO_THINKING)
        assert reply.choices[0].message.content.startswith('{"')
    finished = 0
    for seed in range(4):  # an answer that ends is a whole object; some end within 200 tokens
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0.3, seed=seed,
                                               response_format={"type": "json_object"}, extra_body=NO_THINKING)
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), dict)
            finished += 1
    assert finished >= 1


class Item(BaseModel):
    name: str = Field(max_length=16)
    kind: Literal["function", "class", "module"]
    lines: int = Field(ge=0, le=9999)


def test_parse_with_a_pydantic_model_returns_the_object(client):
    for seed in SEEDS:
        reply = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Item, max_tokens=100,
                                              temperature=1, seed=seed, extra_body=NO_THINKING)
        message = reply.choices[0].message
        assert isinstance(message.parsed, Item)
        jsonschema.validate(json.loads(message.content), Item.model_json_schema())


def test_streamed_json_matches_the_whole_answer(client):
    body = dict(model=MODEL, messages=ASK, max_tokens=150, temperature=1, seed=5, extra_body=NO_THINKING,
                response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}})
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **body) if chunk.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), SCHEMA)


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema"},  # no schema
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no such type"}}},
    {"type": "yaml"},
])
def test_bad_response_formats_are_refused(client, response_format):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, response_format=response_format)
    assert raised.value.body["param"].startswith("response_format")


# --------------------------------------------------------------------------------------- tool calls

def _check_calls(calls, names=PARAMETERS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_required_tool_choice_yields_valid_calls(client):
    for seed, extra in [(seed, extra) for seed in SEEDS for extra in (NO_THINKING, {})]:
        reply = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=120, temperature=1, seed=seed,
                                               extra_body=extra)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls)


def test_required_parallel_calls_are_each_valid(client):
    """With parallel calls allowed the bundled model rarely stops calling: the calls completed before
    max_tokens are valid; one cut off after its name is a call too (its arguments streamed as they came),
    with the arguments written so far, as OpenAI's are; one cut off before stays content."""
    for seed in SEEDS:
        reply = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=120, temperature=1, seed=seed, extra_body=NO_THINKING)
        choice = reply.choices[0]
        calls = choice.message.tool_calls
        if choice.finish_reason == "length":
            assert choice.message.content is None or choice.message.content.lstrip().startswith("<tool_call>")
            if not _is_json(calls[-1].function.arguments):
                calls, cut = calls[:-1], calls[-1]
                assert cut.function.name in PARAMETERS and cut.function.arguments.startswith("{"), cut
        else:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(calls)


def test_a_named_function_is_the_one_called(client):
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model=MODEL, messages=WEATHER_ASK, tools=TOOLS, max_tokens=120, temperature=1, seed=seed,
            tool_choice={"type": "function", "function": {"name": "add"}}, extra_body=NO_THINKING)
        calls = reply.choices[0].message.tool_calls
        assert [call.function.name for call in calls] == ["add"]
        _check_calls(calls, ["add"])


def test_streamed_tool_calls_arrive_as_openai_streams_them(client):
    body = dict(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
                temperature=1, seed=7, extra_body=NO_THINKING)
    whole_choice = client.chat.completions.create(**body).choices[0]
    whole, whole_finish = whole_choice.message.tool_calls, whole_choice.finish_reason
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **body):
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in calls:  # the call's first delta: id, type, name
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
            else:
                assert delta.id is None and not delta.function.name
                calls[delta.index]["arguments"] += delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole_finish and len(calls) >= 2 and sorted(calls) == list(range(len(calls)))
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in whole]


def test_a_forced_call_streams_its_arguments_in_pieces(client):
    """As OpenAI streams a call: its id and name first (arguments ""), then its arguments in several deltas as
    they are written, which join to the arguments of the same request not streamed."""
    for seed in SEEDS:
        body = dict(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                    max_tokens=120, temperature=1, seed=seed, extra_body=NO_THINKING)
        whole = client.chat.completions.create(**body).choices[0].message.tool_calls
        deltas = [delta for chunk in client.chat.completions.create(stream=True, **body) if chunk.choices
                  for delta in chunk.choices[0].delta.tool_calls or []]
        head, pieces = deltas[0], deltas[1:]
        assert head.id.startswith("call_") and head.function.name == whole[0].function.name
        assert head.function.arguments == ""
        assert len(pieces) > 1 and all(d.index == 0 and d.id is None and not d.function.name for d in pieces)
        arguments = "".join(d.function.arguments for d in pieces)
        assert arguments == whole[0].function.arguments
        jsonschema.validate(json.loads(arguments), PARAMETERS[head.function.name])


def test_thinking_then_a_forced_call_streamed_and_whole(client):
    """Thinking on: the bundled model opens a thinking block it never closes by itself; the grammar closes it
    after half of max_tokens, and the call follows. The thinking is reasoning_content, the call a tool call,
    alike in the stream."""
    body = dict(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                max_tokens=120, temperature=1, seed=1)
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert whole.message.reasoning_content and "<think>" not in whole.message.reasoning_content
    _check_calls(whole.message.tool_calls)
    reasoning, arguments = "", ""
    for chunk in client.chat.completions.create(stream=True, **body):
        delta = chunk.choices[0].delta
        assert not delta.content
        reasoning += getattr(delta, "reasoning_content", None) or ""
        arguments += "".join(call.function.arguments or "" for call in delta.tool_calls or [])
    assert reasoning == whole.message.reasoning_content
    assert arguments == whole.message.tool_calls[0].function.arguments


@pytest.fixture(scope="module")
def coder_app():
    """An in-process server whose chat template asks for Qwen3-Coder's XML calls (it mentions <function=)."""
    from fastapi.testclient import TestClient

    from qwen3moe_jax.serve.app import create_app

    model = qj.load(progress=False, max_seq_len=512)
    model.tokenizer.chat_template += "{#- Qwen3-Coder writes calls as <function=NAME><parameter=KEY>... -#}"
    with TestClient(create_app(model, MODEL)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def test_forced_calls_in_qwen3_coder_form_are_valid_calls(coder_app):
    """The grammar writes the calls in the XML form (a call's arguments then go out whole, in one delta, once
    its block closes); they come back as tool calls whose arguments validate, streamed alike."""
    for seed in SEEDS:
        body = dict(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                    max_tokens=120, temperature=1, seed=seed, extra_body=NO_THINKING)
        choice = coder_app.chat.completions.create(**body).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        _check_calls(choice.message.tool_calls)
        deltas = [delta for chunk in coder_app.chat.completions.create(stream=True, **body) if chunk.choices
                  for delta in chunk.choices[0].delta.tool_calls or []]
        assert [d.function.arguments for d in deltas] == ["", choice.message.tool_calls[0].function.arguments]


def test_tool_choice_none_leaves_the_tools_out(client):
    usage = {}
    for choice in ("none", "auto"):
        reply = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=4, temperature=0, extra_body=NO_THINKING)
        usage[choice] = reply.usage.prompt_tokens
        assert reply.choices[0].message.tool_calls is None
    no_tools = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, max_tokens=4, extra_body=NO_THINKING)
    assert usage["none"] == no_tools.usage.prompt_tokens < usage["auto"]


def test_multi_turn_tool_use_goes_back_through_the_template(client):
    # One call, which fits max_tokens (a call cut off has arguments that are not JSON, which no turn may send).
    first = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=1, seed=1,
                                           extra_body=NO_THINKING)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    history = [*WEATHER_ASK, message.model_dump(exclude_none=True),  # content null, arguments as JSON text
               *({"role": "tool", "tool_call_id": call.id, "content": "18 C"} for call in message.tool_calls)]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4,
                                            extra_body=NO_THINKING)
    # The second prompt holds the first (its prompt and its answer) and the tool's reply.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no such type"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tools_are_refused(client, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, max_tokens=4, **fields)
    assert raised.value.body["param"] == param


# ---------------------------------------------------------------------------------------- reasoning

THINKING_TEMPLATE_END = "<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def thinking_app():
    """An in-process server whose template opens the thinking block, as Qwen3's thinking-only models' do."""
    from fastapi.testclient import TestClient

    from qwen3moe_jax.serve.app import create_app

    model = qj.load(progress=False)
    model.tokenizer.chat_template = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + "
                                     "'<|im_end|>\\n' }}{%- endfor %}{{ '<|im_start|>assistant\\n<think>\\n' }}")
    with TestClient(create_app(model, MODEL)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), model


def test_reasoning_content_when_the_prompt_opened_the_block(thinking_app):
    """The reply (the completions API's raw text for the same prompt and seed) split at its first </think>:
    before it reasoning_content, after it content; streamed alike."""
    thinking_app, model = thinking_app
    prompt = model.tokenizer.apply_chat_template(ASK)
    assert prompt.endswith(THINKING_TEMPLATE_END)
    for seed in SEEDS:
        common = dict(model=MODEL, max_tokens=40, temperature=1, seed=seed)
        raw = thinking_app.completions.create(prompt=prompt, stop=["<|im_end|>", "<|endoftext|>"], **common)
        reasoning, closed, content = raw.choices[0].text.partition("</think>")
        reply = thinking_app.chat.completions.create(messages=ASK, **common).choices[0].message
        assert reply.reasoning_content == (reasoning.strip("\n") or None)
        assert reply.content == (content.lstrip() if closed and content.strip() else None)
        chunks = [c.choices[0].delta for c in thinking_app.chat.completions.create(messages=ASK, stream=True, **common)
                  if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == (reply.reasoning_content or "")
        assert "".join(d.content or "" for d in chunks) == (reply.content or "")


def test_thinking_off_changes_nothing(client):
    """With enable_thinking false the content is the raw reply (the completions API's text for the same
    prompt and seed), and there is no reasoning_content."""
    prompt = qj.load(progress=False).tokenizer.apply_chat_template(ASK, enable_thinking=False)
    common = dict(model=MODEL, max_tokens=30, temperature=1, seed=3)
    raw = client.completions.create(prompt=prompt, stop=["<|im_end|>", "<|endoftext|>"], **common)
    reply = client.chat.completions.create(messages=ASK, extra_body=NO_THINKING, **common).choices[0].message
    assert reply.content == raw.choices[0].text and "reasoning_content" not in reply.model_dump()


def test_json_after_a_thinking_block_the_prompt_opened(thinking_app):
    """The prompt opened the block: the grammar lets the model think (closing the block after half of
    max_tokens at the latest), then write the JSON; reasoning_content holds the thinking, and the content
    validates."""
    thinking_app, _ = thinking_app
    for seed in SEEDS:
        choice = thinking_app.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=160, temperature=1, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}).choices[0]
        assert choice.finish_reason == "stop" and choice.message.reasoning_content
        assert "</think>" not in choice.message.reasoning_content + choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
