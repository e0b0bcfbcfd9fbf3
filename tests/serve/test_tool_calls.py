"""Tool calls in Qwen3's format: the parser (whole and streamed), the grammars that force them (checked with
llguidance's own matcher on the bundled tokenizer), the server's checks of tools / tool_choice /
response_format, and multi-turn tool use rendered back through the chat template."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher, LLTokenizer

import qwen3moe_jax as qj
from qwen3moe_jax.serve.grammars import Thinking, json_grammar, tool_call_grammar
from qwen3moe_jax.serve.http import ApiError
from qwen3moe_jax.serve.prepare import prepare_chat
from qwen3moe_jax.serve.reply import ReplyFormat
from qwen3moe_jax.serve.responses import ResponseShape
from qwen3moe_jax.serve.schemas import ChatRequest
from qwen3moe_jax.serve.tool_calls import ToolCallSplitter, joined, parse_tool_call

WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}
CLOCK = {"name": "now"}  # no parameters: any object


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


PARIS = call_text("get_weather", {"city": "Paris"})
ROME = call_text("get_weather", {"city": "Rome", "unit": "celsius"})
TOOLS_BY_NAME = {"get_weather": WEATHER["parameters"], "now": None}


def _feed(text: str, cuts: list[int], tools=TOOLS_BY_NAME, stream_arguments=False):
    """(content, call deltas) of `text` fed in pieces cut at `cuts`."""
    splitter = ToolCallSplitter(tools, stream_arguments)
    content, deltas = "", []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        c, new = splitter.feed(text[a:b])
        content, deltas = content + c, deltas + new
    c, new = splitter.feed("", final=True)
    return content + c, deltas + new


def _split(text: str, cuts: list[int], tools=TOOLS_BY_NAME, stream_arguments=False):
    content, deltas = _feed(text, cuts, tools, stream_arguments)
    return content, [(call.name, json.loads(call.arguments)) for call in joined(deltas)]


# (reply content, expected text, expected calls)
CASES = [
    (PARIS, "", [("get_weather", {"city": "Paris"})]),
    (f"{PARIS}\n{ROME}", "",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    (f"Let me check.\n{PARIS}", "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("No tools needed.", "No tools needed.", []),
    # Malformed blocks stay text, as written; the well-formed ones around them are still calls.
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    (f'{PARIS}\n<tool_call>\n{{"arguments": {{}}}}\n</tool_call>',
     '\n<tool_call>\n{"arguments": {}}\n</tool_call>', [("get_weather", {"city": "Paris"})]),
    (call_text("launch_missiles", {}), call_text("launch_missiles", {}), []),  # not one of the tools
    ('<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>',
     '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>', []),  # arguments must be an object
    ('<tool_call>\n{"name": "now"}\n</tool_call>', "", [("now", {})]),  # no arguments: none
    # Arguments the tool's parameters schema refuses stay text, as written.
    (call_text("get_weather", {"city": 3}), call_text("get_weather", {"city": 3}), []),
    (call_text("get_weather", {"town": "Paris"}), call_text("get_weather", {"town": "Paris"}), []),
    (f"{PARIS}\n{call_text('get_weather', {'city': 'x' * 21})}", "\n" + call_text("get_weather", {"city": "x" * 21}),
     [("get_weather", {"city": "Paris"})]),
    (call_text("now", {"any": [1, "thing"]}), "", [("now", {"any": [1, "thing"]})]),  # no schema: any object
    ('Cut off: <tool_call>\n{"name": "now", "argu', 'Cut off: <tool_call>\n{"name": "now", "argu', []),
    ("a <tool_cal", "a <tool_cal", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_tool_calls_are_parsed_out_of_a_whole_reply(text, content, calls):
    assert _split(text, []) == (content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_a_streamed_reply_parses_alike_wherever_it_is_cut(text, content, calls):
    for i in range(len(text) + 1):
        assert _split(text, [i]) == (content, calls), i
    assert _split(text, list(range(1, len(text)))) == (content, calls)


def test_a_call_goes_out_when_its_block_closes_and_text_before_it_at_once():
    splitter = ToolCallSplitter({"get_weather": WEATHER["parameters"]})
    assert splitter.feed("Checking") == ("Checking", [])
    assert splitter.feed(".\n<tool_") == (".", [])  # the newline and a possible tag are held back
    assert splitter.feed(PARIS[len("<tool_"):-1]) == ("", [])  # unconstrained: nothing until the block closes
    text, deltas = splitter.feed(PARIS[-1])
    assert text == "" and [(d.index, d.call and d.call.name, d.arguments) for d in deltas] == [
        (0, "get_weather", ""), (0, None, '{"city": "Paris"}')]
    assert deltas[0].openai() == {"index": 0, "id": deltas[0].call.id, "type": "function",
                                  "function": {"name": "get_weather", "arguments": ""}}
    assert deltas[1].openai() == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}


# Calls as the forcing grammar writes them (json.dumps's separators), and the arguments text each must give.
FORCED = [(PARIS, ['{"city": "Paris"}']),
          (f"{PARIS}\n{ROME}", ['{"city": "Paris"}', '{"city": "Rome", "unit": "celsius"}']),
          (call_text("now", {"deep": {"a": [1, {"b": "}"}]}, "s": "x}\n</tool"}),
           ['{"deep": {"a": [1, {"b": "}"}]}, "s": "x}\\n</tool"}']),
          ('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', ["{}"])]


@pytest.mark.parametrize(("text", "arguments"), FORCED)
def test_streamed_arguments_come_in_pieces_that_join_to_the_whole_calls(text, arguments):
    """With stream_arguments (decoding constrained to calls) a call's head goes out as soon as its name is
    known, then its arguments as they come; wherever the text is cut, the pieces join to the arguments of
    the whole reply, which are the text as written (valid JSON), as the unconstrained splitter gives them."""
    whole_content, whole = _feed(text, [], stream_arguments=True)
    assert whole_content == "" and [c.arguments for c in joined(whole)] == arguments
    assert [c.arguments for c in joined(_feed(text, [])[1])] == arguments  # as without stream_arguments
    for cuts in [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))]:
        content, deltas = _feed(text, cuts, stream_arguments=True)
        assert content == "" and [c.arguments for c in joined(deltas)] == arguments, cuts
        heads = [d for d in deltas if d.call is not None]
        assert [d.index for d in heads] == list(range(len(arguments))) and all(d.arguments == "" for d in heads)
    # Fed a character at a time, the arguments come in many pieces, and each call's head before them.
    _, deltas = _feed(text, list(range(1, len(text))), stream_arguments=True)
    for index, expected in enumerate(arguments):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].call is not None and all(d.call is None for d in mine[1:])
        assert len(mine) > 2  # the head and at least two pieces
        assert isinstance(json.loads(expected), dict)


def test_a_streamed_call_goes_out_before_its_block_closes():
    splitter = ToolCallSplitter({"get_weather": WEATHER["parameters"]}, stream_arguments=True)
    assert splitter.feed('<tool_call>\n{"name": "get_weather", "arguments": ') == ("", [])  # a space may follow
    _, deltas = splitter.feed('{"city": "Pa')
    assert [(d.call and d.call.name, d.arguments) for d in deltas] == [("get_weather", ""), (None, '{"city": "Pa')]
    _, deltas = splitter.feed('ris"}')  # this brace may be the body's end: held
    assert [d.arguments for d in deltas] == ['ris"']
    _, deltas = splitter.feed('}\n</tool')  # now that one is, and the tag may be coming
    assert [d.arguments for d in deltas] == ["}"]
    assert splitter.feed("_call>") == ("", [])


def test_a_streamed_call_cut_off_keeps_the_arguments_written():
    """max_tokens ends the reply inside a constrained call: the call was sent, so it stays one (as OpenAI's
    do, with finish_reason "length"), with the arguments written so far; the whole reply splits alike."""
    text = PARIS[:-len('"}}\n</tool_call>')]
    for cuts in [[], [len(text) - 3], list(range(1, len(text)))]:
        content, deltas = _feed(text, cuts, stream_arguments=True)
        assert content == "" and [(c.name, c.arguments) for c in joined(deltas)] == [("get_weather", '{"city": "Paris')]
    assert _feed(text, [])[0] == text  # unconstrained, a block cut off stays text


# ------------------------------------------------------------------------- Qwen3-Coder's XML form

def xml_call(name: str, **parameters: str) -> str:
    """A call as Qwen3-Coder's chat template asks for it."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


SEARCH = {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"},
    "filters": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
    "ratio": {"type": ["number", "null"]}, "note": {"description": "no type: text"}}, "required": ["query"]}
CODER_TOOLS = {"get_weather": WEATHER["parameters"], "search": SEARCH, "now": None}
EVERY_TYPE = xml_call("search", query="42", limit="10", exact="true", filters='{"lang": "py"}', tags='["a", "b"]',
                      ratio="null", note="7")

# (reply content, expected text, expected calls)
CODER_CASES = [
    (xml_call("get_weather", city="Paris"), "", [("get_weather", {"city": "Paris"})]),
    # Each value by its type in the schema: strings (and untyped) stay text, the rest is read as JSON.
    (EVERY_TYPE, "", [("search", {"query": "42", "limit": 10, "exact": True, "filters": {"lang": "py"},
                                  "tags": ["a", "b"], "ratio": None, "note": "7"})]),
    (xml_call("search", query="  two\nlines\n"), "", [("search", {"query": "  two\nlines\n"})]),  # one newline off
    ("<tool_call>\n<function=now>\n</function>\n</tool_call>", "", [("now", {})]),
    (f"Let me look.\n{xml_call('get_weather', city='Paris')}\n{xml_call('search', query='rain', limit='3')}\n{ROME}",
     "Let me look.", [("get_weather", {"city": "Paris"}), ("search", {"query": "rain", "limit": 3}),
                      ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    # Not calls: they stay text, as written.
    (xml_call("search", query="x", limit="ten"), xml_call("search", query="x", limit="ten"), []),  # not an integer
    (xml_call("get_weather", city="Paris", town="x"), xml_call("get_weather", city="Paris", town="x"), []),
    (xml_call("launch", city="Paris"), xml_call("launch", city="Paris"), []),  # not one of the tools
    (xml_call("search", query="a", limit="1").replace("limit", "query"),
     xml_call("search", query="a", limit="1").replace("limit", "query"), []),  # a parameter twice
    ("<tool_call>\n<function=now>\nhello\n</function>\n</tool_call>",
     "<tool_call>\n<function=now>\nhello\n</function>\n</tool_call>", []),  # text between parameters
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "<tool_call>\n<function=get_weather>\n"
     "<parameter=city>\nPar", []),  # cut off
]


@pytest.mark.parametrize("stream_arguments", [False, True])
@pytest.mark.parametrize(("text", "content", "calls"), CODER_CASES)
def test_coder_xml_calls_parse_alike_whole_and_cut_anywhere(text, content, calls, stream_arguments):
    """An XML call goes out whole once its block closes, even when decoding is constrained (the grammar
    writes the JSON form)."""
    one_cut = [[i] for i in range(len(text) + 1)] if not stream_arguments else []
    for cuts in [[], *one_cut, list(range(1, len(text)))]:
        assert _split(text, cuts, CODER_TOOLS, stream_arguments) == (content, calls), cuts


def test_the_server_reads_coder_calls_by_the_tools_schemas():
    shape = ResponseShape("chatcmpl-1", "m", True, None, ReplyFormat(tools=CODER_TOOLS))
    message, calls = shape.message("Searching.\n" + xml_call("search", query="rain", limit="3"))
    assert calls == 1 and message["content"] == "Searching."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"query": "rain", "limit": 3}


def test_coder_xml_arguments_are_json_text():
    call = parse_tool_call(xml_call("get_weather", city="Zürich")[len("<tool_call>"):-len("</tool_call>")],
                           CODER_TOOLS)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Zürich"}')


def test_a_schema_whose_reference_cannot_be_resolved_refuses_calls():
    """No schema is fetched, so a call of a tool whose parameters refer elsewhere cannot be checked: text."""
    for ref in ("#/$defs/missing", "https://example.com/city.json"):
        tools = {"get_weather": {"type": "object", "properties": {"city": {"$ref": ref}}}}
        assert _split(PARIS, [], tools) == (PARIS, [])


def test_calls_have_openai_ids_and_json_text_arguments():
    call = parse_tool_call('{"name": "get_weather", "arguments": {"city": "Zürich"}}')
    other = parse_tool_call('{"name": "get_weather", "arguments": {"city": "Zürich"}}')
    assert call.openai() == {"id": call.id, "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
    assert call.id.startswith("call_") and call.id != other.id
    assert parse_tool_call("[1, 2]") is None and parse_tool_call('{"name": 3}') is None


# ------------------------------------------------------------------------------------------ grammars

@pytest.fixture(scope="module")
def tokenizer():
    return qj.load(progress=False).tokenizer


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    """Whether llguidance's matcher takes the tokens of `text` and may stop after them."""
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar)) == ""
    matcher = LLMatcher(LLTokenizer(tokenizer.backend.to_str()), LLMatcher.grammar_from_lark(grammar),
                        log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


def _has(tokenizer):
    return lambda tag: tokenizer.token_id(tag) is not None


THINK = "<think>\nThe user wants the weather.\n</think>\n\n"
OPTIONAL, OPENED = Thinking(opened=False, max_tokens=100), Thinking(opened=True, max_tokens=100)


@pytest.mark.parametrize(("several", "thinking", "text", "accepted"), [
    (False, None, PARIS, True),
    (False, None, ROME, True),
    (False, None, call_text("now", {"any": [1, "thing"]}), True),
    (False, None, f"{PARIS}\n{ROME}", False),  # one call only
    (True, None, f"{PARIS}\n{ROME}", True),
    (True, None, "", False),  # at least one
    (False, None, call_text("get_weather", {"town": "Paris"}), False),  # not the schema's property
    (False, None, call_text("get_weather", {"unit": "celsius"}), False),  # a required property missing
    (False, None, call_text("get_weather", {"city": "x" * 21}), False),  # past maxLength
    (False, None, call_text("get_time", {}), False),  # not one of the tools
    (False, None, "Sure: " + PARIS, False),  # no text before the call
    (False, None, THINK + PARIS, False),  # no thinking when thinking is off
    (False, OPTIONAL, THINK + PARIS, True),
    (False, OPTIONAL, PARIS, True),
    (False, OPTIONAL, THINK, False),
    (False, OPENED, "The user wants the weather.\n</think>\n\n" + PARIS, True),
    (False, OPENED, PARIS, False),  # the prompt opened the block: it must close first
])
def test_tool_call_grammar_admits_exactly_calls_of_the_tools(tokenizer, several, thinking, text, accepted):
    grammar = tool_call_grammar([WEATHER, CLOCK], several, thinking, _has(tokenizer))
    assert _accepts(tokenizer, grammar, text) is accepted


@pytest.mark.parametrize(("thinking", "text", "accepted"), [
    (None, '{"city": "Paris"}', True),
    (None, '{"city": 3}', False),
    (None, '{"city": "Paris"} and more', False),
    (OPTIONAL, THINK + '{"city": "Paris"}', True),
    (OPTIONAL, '{"city": "Paris", "unit": "celsius"}', True),
    (OPENED, 'hmm\n</think>\n\n{"city": "Paris"}', True),
])
def test_json_grammar_admits_the_schema_after_an_optional_thinking_block(tokenizer, thinking, text, accepted):
    grammar = json_grammar(WEATHER["parameters"], thinking, _has(tokenizer))
    assert _accepts(tokenizer, grammar, text) is accepted


def test_thinking_is_closed_after_its_budget(tokenizer):
    """Past max_tokens of thinking only </think> may come (then the structure), whatever the model wants."""
    grammar = json_grammar({"type": "integer"}, Thinking(opened=True, max_tokens=4), _has(tokenizer))
    matcher = LLMatcher(LLTokenizer(tokenizer.backend.to_str()), LLMatcher.grammar_from_lark(grammar), log_level=0)
    words = tokenizer.encode(" one two three four five six")
    assert matcher.consume_tokens(words[:4])
    assert matcher.validate_tokens(words[4:5]) == 0  # a fifth token of thinking is refused
    assert matcher.consume_tokens(tokenizer.encode("</think>\n\n42")) and matcher.is_accepting()
    roomy = json_grammar({"type": "integer"}, Thinking(opened=True, max_tokens=40), _has(tokenizer))
    assert _accepts(tokenizer, roomy, " one two three four five six</think>\n\n42")


CODER_SEARCH = {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["query"], "additionalProperties": False}}
PATTERNED = {"name": "lookup", "parameters": {"type": "object", "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]}}  # raw text cannot keep to it


@pytest.mark.parametrize(("text", "accepted"), [
    (xml_call("search", query="rain"), True),
    (xml_call("search", query="two\nlines", limit="3", unit="celsius"), True),
    (xml_call("search", query="rain", unit="fahrenheit"), True),  # an optional one left out
    (xml_call("search", query="x" * 11), True),
    (xml_call("search", query="x" * 12), False),  # past maxLength with the newline before </parameter>
    (xml_call("search", limit="3", query="rain"), False),  # not in the schema's order
    (xml_call("search", limit="3"), False),  # a required one missing
    (xml_call("search", query="rain", limit="ten"), False),
    (xml_call("search", query="rain", limit="51"), False),
    (xml_call("search", query="rain", unit="kelvin"), False),
    (xml_call("search", query="rain", page="2"), False),  # not one of its parameters
    (call_text("search", {"query": "rain"}), False),  # this tool's calls are XML
    (call_text("lookup", {"code": "ABC"}), True),  # a pattern: the JSON form
    (call_text("lookup", {"code": "abc"}), False),
    (xml_call("lookup", code="ABC"), False),
])
def test_with_a_coder_template_forced_calls_are_xml_where_the_schema_allows(tokenizer, text, accepted):
    grammar = tool_call_grammar([CODER_SEARCH, PATTERNED], False, None, _has(tokenizer), xml=True)
    assert _accepts(tokenizer, grammar, text) is accepted
    if accepted:  # what the grammar admits parses as a call that fits its schema
        content, calls = _split(text, [], {t["name"]: t["parameters"] for t in (CODER_SEARCH, PATTERNED)})
        assert content == "" and len(calls) == 1


def test_a_coder_template_makes_forced_calls_xml(model, monkeypatch):
    forced = {"tools": TOOLS, "tool_choice": "required"}
    assert '"<function=get_weather>' not in _prepare(model, **forced).sampling.grammar
    monkeypatch.setattr(model.tokenizer, "chat_template",
                        model.tokenizer.chat_template + "{#- Calls: <function=NAME><parameter=KEY>... -#}")
    assert '"<function=get_weather>' in _prepare(model, **forced).sampling.grammar


def test_without_tag_tokens_the_tags_are_text(tokenizer):
    grammar = tool_call_grammar([WEATHER], False, None, lambda tag: False)
    assert "<tool_call>" not in grammar.replace('"<tool_call>"', "")  # every tag is a quoted string
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar)) == ""


# ------------------------------------------------------------------------------- the server's checks

@pytest.fixture(scope="module")
def model():
    return qj.load(progress=False)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER["parameters"]}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _prepare(model, **fields):
    body = ChatRequest.model_validate({"model": "m", "messages": ASK, "max_tokens": 4} | fields)
    return prepare_chat(model, body, model.encode)


@pytest.mark.parametrize(("fields", "param", "match"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS + TOOLS}, "tools", "same name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no such type"}}}]}, "tools",
     "'f': parameters is not a JSON schema"),  # tool_choice "auto" too: calls are checked against it
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$schema": ["x"]}}}]}, "tools",
     "'f': parameters is not a JSON schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format",
     "cannot constrain"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "not JSON"),
])
def test_bad_tools_and_formats_are_refused_with_the_parameter_named(model, fields, param, match):
    with pytest.raises(ApiError, match=match) as raised:
        _prepare(model, **fields)
    assert (raised.value.status, raised.value.param) == (400, param)


@pytest.mark.parametrize("body", [
    {"tools": [{"type": "function", "function": {"name": "has space"}}]},
    {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
    {"tool_choice": "sometimes"},
    {"response_format": {"type": "yaml"}},
])
def test_malformed_tools_fail_validation(body):
    with pytest.raises(ValueError):
        ChatRequest.model_validate({"model": "m", "messages": ASK} | body)


def test_tool_choice_none_offers_no_tools_and_parses_none(model):
    offered = _prepare(model, tools=TOOLS, tool_choice="auto")
    hidden = _prepare(model, tools=TOOLS, tool_choice="none")
    plain = _prepare(model)
    assert "get_weather" in model.tokenizer.decode(offered.prompt)
    assert offered.reply.tools == {"get_weather": WEATHER["parameters"]}
    assert hidden.prompt == plain.prompt and hidden.reply.tools is None


def test_multi_turn_tool_use_renders_as_qwen3_writes_it(model):
    """The assistant's earlier call comes back from an OpenAI client with content null and arguments as JSON
    text; the template must see an object, written as Qwen3 wrote it, and the tool's reply in a
    <tool_response> block of a user turn."""
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    prepared = _prepare(model, messages=messages, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    tools_json = json.dumps(TOOLS[0], ensure_ascii=False)
    expected = ("<|im_start|>system\n# Tools\n\nYou may call functions:\n<tools>\n" + tools_json +
                "\n</tools><|im_end|>\n"
                "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                '<|im_start|>assistant\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                "</tool_call><|im_end|>\n"
                "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert model.tokenizer.decode(prepared.prompt) == expected


def test_a_parameters_schema_is_checked_once_for_all_its_uses():
    """The server checks a request's tool schemas to refuse a bad one, the reply's parser builds validators
    from them, and agents send the same tools every turn: one validator per schema, however it is spelled."""
    from qwen3moe_jax.serve.tool_calls import parameters_validator

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    same = {"required": ["a"], "properties": {"a": {"type": "integer"}}, "type": "object"}
    assert parameters_validator(schema) is parameters_validator(same)
    assert parameters_validator(schema).is_valid({"a": 1}) and not parameters_validator(schema).is_valid({"a": "x"})
    assert parameters_validator(None) is parameters_validator({"type": "object"})
    with pytest.raises(ValueError, match="not a JSON schema"):
        parameters_validator({"type": "no such type"})
