"""Everything a request's body must pass before it reaches the scheduler, turned into a `Prepared` request: the
sampling settings (and OpenAI's parameters this server refuses), the chat template over the messages, the tools
offered and the calls or JSON that constrain decoding, the tokenizer, and the checks against the vocabulary and
the KV cache. A bad request ends here as an ApiError(4xx); runs in a worker thread (it tokenizes)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable
from typing import Any

from qwen3moe_jax.api import Model
from qwen3moe_jax.errors import ConstraintError, ContextLengthError, Qwen3MoeError
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.scheduler import Request
from qwen3moe_jax.serve.grammars import Thinking, json_grammar, tool_call_grammar
from qwen3moe_jax.serve.http import ApiError
from qwen3moe_jax.serve.reasoning import prompt_opens_thinking
from qwen3moe_jax.serve.reply import ReplyFormat
from qwen3moe_jax.serve.schemas import BaseRequest, ChatRequest, CompletionRequest, Message, NamedToolChoice
from qwen3moe_jax.serve.tokenizer_process import TokenizerUnavailable
from qwen3moe_jax.serve.tool_calls import parameters_validator


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request that passed every check and can only fail now if the server does: its prompt's token ids
    and its sampling settings (stop ids resolved: the chat stop ids, or None for the model's EOS ids), and
    the scheduler's request made of them."""

    prompt: list[int]
    sampling: SamplingParams
    request: Request | None = None
    reply: ReplyFormat | None = None  # chat: how the reply text becomes OpenAI's message fields
    echo: bool = False  # completions: the prompt comes back before the completion (with its logprobs, if asked)


UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "best_of": (1,),
               "suffix": ("",)}


def sampling_params(model: Model, body: BaseRequest, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams, after refusing the UNSUPPORTED parameters that ask for something.
    top_k >= the vocabulary keeps every token, exactly as top_k off does, and repeat_last_n >= the KV cache
    length covers the whole context as that length does: both are mapped to the value the engine's int32
    arrays hold."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value is not None and value not in neutral:
            raise ApiError(400, f"{name} is not supported by this server: leave it out or send {neutral[0]!r}",
                           name, "unsupported_parameter")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    top_k = body.top_k if 0 < body.top_k < model.config.vocab_size else 0
    try:
        return SamplingParams(
            temperature=body.temperature, top_k=top_k, top_p=body.top_p,
            repeat_penalty=body.repetition_penalty, repeat_last_n=min(body.repeat_last_n, model.max_seq_len),
            seed=secrets.randbelow(2**32) if body.seed is None else body.seed,  # no seed: a fresh draw
            max_new_tokens=max_tokens, stop=tuple(stop), logprobs=logprobs,
        )
    except Qwen3MoeError as err:
        raise ApiError(400, str(err), code="invalid_value") from err


Encode = Callable[[str], list[int]]


def prepare_chat(model: Model, body: ChatRequest, encode: Encode) -> Prepared:
    """The chat template and the tokenizer (`encode`) over the messages, and every check (blocking: run it
    in a thread)."""
    if model.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so no chat template: use /v1/completions with "
                       "token ids", "messages", "invalid_value")
    if body.echo:
        raise ApiError(400, "echo is for /v1/completions (the prompt's text and logprobs): chat does not echo",
                       "echo", "unsupported_parameter")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(model, body, body.max_completion_tokens or body.max_tokens, logprobs)
    tools, must_call = _offered_tools(body)
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    try:
        text, params = model.prepare_chat(messages, params, tools=tools, **(body.chat_template_kwargs or {}))
    except Qwen3MoeError as err:
        raise ApiError(400, str(err), "messages", "invalid_value") from err
    except TypeError as err:  # a chat_template_kwargs key that clashes with the template's own arguments
        raise ApiError(400, str(err), "chat_template_kwargs", "invalid_value") from err
    # Thinking is on unless the template was told otherwise; then Qwen3's templates pre-fill an empty block.
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking", True) is not False
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools} if tools else None
    reply = ReplyFormat(reasoning=thinking, opened=thinking and prompt_opens_thinking(text),
                        tools=schemas, stream_arguments=must_call is not None)
    prompt = _tokenized(encode, text)
    params, asked_by = _constrained(model, body, params, must_call, reply, len(prompt))
    return dataclasses.replace(_checked(model, prompt, params, "messages", asked_by), reply=reply)


def _offered_tools(body: ChatRequest) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """(the tools the template offers the model, the functions decoding must call: None unless tool_choice
    is "required" or names one). tool_choice "none" offers none, as vLLM does."""
    choice = body.tool_choice
    functions = [tool.function.model_dump(exclude_none=True) for tool in body.tools or []]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise ApiError(400, "tools: two tools have the same name", "tools", "invalid_value")
    if choice not in (None, "none", "auto") and not functions:
        raise ApiError(400, "tool_choice needs tools: send the tools it may call", "tool_choice", "invalid_value")
    if choice == "none" or not functions:
        return None, None
    for function in functions:  # a call's arguments are checked against them
        try:
            parameters_validator(function.get("parameters"))
        except ValueError as err:
            raise ApiError(400, f"tools: the function {function['name']!r}: {err}", "tools", "invalid_value") from err
    offered = [{"type": "function", "function": f} for f in functions]
    if choice == "required":
        return offered, functions
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ApiError(400, f"tool_choice names the function {choice.function.name[:64]!r}, which is not "
                                "one of the tools", "tool_choice", "invalid_value")
        return offered, [f for f in functions if f["name"] == choice.function.name]
    return offered, None


def _constrained(model: Model, body: ChatRequest, params: SamplingParams, must_call: list[dict[str, Any]] | None,
                 reply: ReplyFormat, prompt_length: int) -> tuple[SamplingParams, str | None]:
    """(`params` with the grammar that tool_choice ("required" or a named function: `must_call`) or
    response_format asks for, the parameter that asked: "tools", "response_format" or None). With thinking on,
    a thinking block of at most half the reply's tokens may come first (or must be closed first, when the
    prompt opened it), and the structure follows."""
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise ApiError(400, 'response_format of type "json_schema" needs json_schema: {"name": ..., "schema": '
                            '{...}}', "response_format", "invalid_value")
    if must_call is None and not wants_json:
        return params, None
    if must_call is not None and wants_json:
        raise ApiError(400, "response_format cannot constrain a reply that tool_choice makes a tool call",
                       "response_format", "invalid_value")
    limit = params.max_new_tokens or model.max_seq_len - prompt_length
    thinking = Thinking(reply.opened, limit // 2) if reply.reasoning else None

    def has_token(tag: str) -> bool:
        return model.tokenizer.token_id(tag) is not None

    if must_call is not None:
        several = body.tool_choice == "required" and body.parallel_tool_calls
        xml = "<function=" in (model.tokenizer.chat_template or "")  # Qwen3-Coder's template asks for XML calls
        param = "tools"
        constraint = {"grammar": tool_call_grammar(must_call, several, thinking, has_token, xml)}
    else:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
        param = "response_format"
        constraint = ({"json_schema": schema} if thinking is None else
                      {"grammar": json_grammar(schema, thinking, has_token)})
    try:
        return dataclasses.replace(params, **constraint), param
    except Qwen3MoeError as err:
        raise ApiError(400, f"{param}: {err}", param, "invalid_value") from err


def prepare_completion(model: Model, body: CompletionRequest, encode: Encode) -> list[Prepared]:
    """The tokenizer (`encode`) over each prompt, or its token ids as given, and every check (blocking: run it
    in a thread). With echo and logprobs, each prompt token after the first is scored (its logprobs, given the
    tokens before it, and as many alternatives as logprobs asks for)."""
    params = sampling_params(model, body, body.max_tokens, body.logprobs)
    prompts = body.prompt if isinstance(body.prompt, list) and isinstance(body.prompt[0], str | list) else \
        [body.prompt]
    prepared = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", param,
                               "invalid_value")
            prompt = _tokenized(encode, prompt)
        scored = body.echo and body.logprobs is not None and len(prompt) > 1
        checked = _checked(model, prompt, dataclasses.replace(params, prompt_logprobs=body.logprobs) if scored
                           else params, param)
        prepared.append(dataclasses.replace(checked, echo=body.echo))
    return prepared


def _tokenized(encode: Encode, text: str) -> list[int]:
    try:
        return encode(text)
    except TokenizerUnavailable as err:  # the server's fault, not the request's: it may be sent again
        raise ApiError(503, f"{err}; retry shortly", kind="server_error", code="tokenizer_unavailable",
                       headers={"Retry-After": "1"}) from err


def _checked(model: Model, prompt: list[int], sampling: SamplingParams, param: str,
             constraint_param: str | None = None) -> Prepared:
    """The request once Model.request accepts it: token ids in the vocabulary, prompt + max_tokens within the
    KV cache, stop strings only with a tokenizer, logprobs within what the engine computes, a constraint
    llguidance accepts (its error names `constraint_param`, the parameter that asked for it)."""
    try:
        return Prepared(prompt, sampling, model.request(prompt, sampling))
    except ContextLengthError as err:
        raise ApiError(400, str(err), param, "context_length_exceeded") from err
    except ConstraintError as err:
        where = constraint_param or param
        raise ApiError(400, f"{where}: {err}", where, "invalid_value") from err
    except Qwen3MoeError as err:
        raise ApiError(400, str(err), param, "invalid_value") from err


def _message_dict(message: Message, index: int) -> dict[str, Any]:
    """A message as chat templates take it: text parts joined, and an assistant's tool calls with their
    arguments as objects (OpenAI sends them as JSON text; Qwen3's templates write objects with tojson)."""
    out = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):  # text parts, joined as OpenAI's own models read them
        out["content"] = "".join(part.text for part in message.content)
    if message.content is None and message.role in ("assistant", "tool"):  # an assistant's turn of calls alone
        out["content"] = ""
    for i, call in enumerate(out.get("tool_calls", [])):
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            try:
                call["function"]["arguments"] = json.loads(arguments)
            except ValueError as err:
                param = f"messages.{index}.tool_calls.{i}.function.arguments"
                raise ApiError(400, f"{param}: not JSON text ({err})", param, "invalid_value") from None
        if not isinstance(call["function"]["arguments"], dict):
            param = f"messages.{index}.tool_calls.{i}.function.arguments"
            raise ApiError(400, f"{param}: must be a JSON object", param, "invalid_value")
    return out
