"""An OpenAI-compatible demo server (CONTRACTS.md, Server): /v1/chat/completions and /v1/completions,
streamed as server-sent events or returned whole, /v1/models, /health and /metrics.

    qwen3moe-jax serve --model FILE.gguf --port 8000 [--api-key KEY] [--max-request-bytes N]

How a request runs, and where each bad request is turned away (always with OpenAI's error object, and
always before a response starts, so a streaming request with bad parameters gets a 4xx, not a 200):
  1. `_Gate`, an ASGI middleware around the app: 401 for a /v1 route without the API key (when the server
     has one); 413 when Content-Length exceeds max_request_bytes (nothing of the body is read), or when a
     chunked body grows past it while read; and a 500 error object for an exception nothing else caught,
     with the connection kept open.
  2. `_JsonRoute`, the routes' class: 400 unless Content-Type is JSON; the body is parsed by `parse_json`
     (in a worker thread): UTF-8, JSON, no NaN/Infinity or number past float range, no lone UTF-16
     surrogate in any string or key, nesting at most MAX_JSON_DEPTH deep.
  3. pydantic models (`ChatRequest`, `CompletionRequest`): types and ranges; they are also what
     /openapi.json describes.
  4. The handler: the model name (404), then `prepare_chat` / `prepare_completion` in a worker thread
     (`run_in_threadpool`): sampling settings (`sampling_params`, which also refuses OpenAI parameters the
     server does not implement), the chat template, the tokenizer (texts over SHORT_TEXT_CHARS go to
     `TokenizerProcess`, a child process, since the tokenizer holds the GIL), token ids against the
     vocabulary and prompt + max_tokens against the KV cache. The result, a `Prepared` request (token ids +
     SamplingParams), cannot fail on its input any more.
  5. `start` submits it to the model's scheduler (scheduler.py), whose loop runs on a thread of its own
     (`Worker`): up to --max-batch requests share each decode step, and up to --max-queue wait for a row;
     beyond that a request gets 503 with Retry-After. The loop passes each event to the job's asyncio queue;
     the response reads from it.
A chat reply is parsed as it comes (tool_calls.ReplyParser, set up by the request's ReplyFormat): a leading
thinking block goes to reasoning_content and <tool_call> blocks to tool_calls; tool_choice "required" or a
named function, and response_format, constrain decoding with a grammar (`_constrained`).
A job is cancelled (its request leaves the scheduler at the next step, freeing its row without disturbing
the others) when its client goes away: for a streaming response Starlette stops the body iterator (see
_sse); for a whole response `_respond` waits for the ASGI http.disconnect message beside the events.
/metrics serves Prometheus text (prometheus_client), from a registry of each app's own.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from qwen3moe_jax import scheduler as sched
from qwen3moe_jax import tool_calls
from qwen3moe_jax.api import Model
from qwen3moe_jax.errors import ConstraintError, ContextLengthError, Qwen3MoeError
from qwen3moe_jax.generation import Event
from qwen3moe_jax.sampling import SamplingParams
from qwen3moe_jax.scheduler import Emit, QueueFull, Scheduler
from qwen3moe_jax.tokenizer import Tokenizer

FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "grammar_complete": "stop",
                  "max_new_tokens": "length", "cache_full": "length"}


# ---------------------------------------------------------------------------------------------- requests

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64  # deep enough for any tool's JSON schema; deeper bodies are an attack, not a request
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000  # the stop-string filter's per-token work grows with a stop string's length squared



def _integral(value: Any) -> Any:
    # In JSON 5.0 is the integer 5 (and some encoders write every number with a fraction); 5.5 stays a float,
    # which strict validation then refuses.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    """Fields shared by both endpoints. Strict: a string where a number belongs is an error, as at OpenAI.
    Unknown fields are ignored, so clients that send more of OpenAI's API still work.

    Integers the engine holds as int32 are taken at any size where a larger value means exactly what the
    largest useful one does: top_k >= the vocabulary is top_k off, repeat_last_n >= the KV cache length is
    the whole context (see sampling_params). max_tokens of any size is checked against the KV cache."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, description="extension: 0 or -1 is off, and so is any value >= the vocabulary")
    seed: Int | None = Field(None, ge=0, lt=2**32)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    # Bounded so that penalized logits stay finite in float32 at any temperature.
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="extension, llama.cpp/vLLM style")
    repeat_last_n: Int = Field(64, ge=0, description="extension: the penalty's window (past the KV cache "
                                                     "length: the whole context)")
    n: Int = Field(1, ge=1, le=1, description="one choice per request")
    # OpenAI's parameters this server does not implement: refused unless neutral (see UNSUPPORTED), never ignored.
    presence_penalty: float | None = Field(None, description="not supported: only 0")
    frequency_penalty: float | None = Field(None, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only {}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for names


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text, as OpenAI sends it back (or an object)")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_call_id, reasoning_content... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # extension, e.g. {"enable_thinking": false}
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None


class CompletionRequest(_Request):
    # Token ids are plain ints: a per-item validator in Python would take 0.25 s, on the event loop, for the
    # 1.4 million ids a 4 MiB body can hold (Rust's own check takes 0.07 s).
    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    logprobs: Int | None = Field(None, ge=0, le=5)
    max_tokens: Int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool | None = Field(None, description="not supported: only false")
    best_of: Int | None = Field(None, description="not supported: only 1")
    suffix: str | None = Field(None, description='not supported: only ""')


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before", "union",
               "constrained-str", "NamedToolChoice"}
_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


class ApiError(HTTPException):
    """A request the server refuses, answered with OpenAI's error object. An HTTPException, so that FastAPI
    passes it on unchanged when it is raised while the body is read (see _JsonRequest)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(body: bytes) -> Any:
    """The request body as JSON, held to what the server can take in every string and number: UTF-8,
    no NaN or Infinity (nor a number that overflows to it, like 1e999), no lone UTF-16 surrogate (a JSON
    escape such as \\ud800 that no text can hold: the tokenizer, the template and the response encoder all
    fail on it), and at most MAX_JSON_DEPTH levels of nesting. Raises ApiError(400)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not valid UTF-8: {err}", code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    except ValueError as err:  # _no_constant, or an integer of more digits than Python converts
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    pending: list[tuple[Any, tuple]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ApiError(400, f"{_where(path)}: the number is out of range", _param(path), "invalid_value")
        elif isinstance(item, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    _check_text(key, path)
                if not isinstance(child, int | bool | None):  # the common leaves need no second look
                    pending.append((child, (*path, key)))
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_text(text: str, path: tuple) -> None:
    if _SURROGATE.search(text):
        raise ApiError(400, f"{_where(path)}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                            "escape), which is no character", _param(path), "invalid_value")


def _param(path: tuple) -> str | None:
    return ".".join(map(str, path)) or None


def _where(path: tuple) -> str:
    return _param(path) or "body"


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await run_in_threadpool(parse_json, await self.body())  # a 4 MiB body takes a while
        return self._json


class _JsonRoute(APIRoute):
    """A route whose body must be JSON (Content-Type application/json or +json: a web page cannot send that
    cross-site without the browser asking first), parsed by parse_json."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route(request: Request) -> Response:
            if takes_body and not _is_json(request.headers.get("content-type", "")):
                raise ApiError(400, "the body must be JSON, sent with the header Content-Type: application/json "
                                    f"(got {request.headers.get('content-type', 'none')!r:.80})",
                               code="invalid_content_type")
            return await handler(_JsonRequest(request.scope, request.receive))

        return route


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and
                                                 media_type.endswith("+json"))


class _Gate:
    """ASGI middleware: the API key, the body-size limit, and the last word on unexpected exceptions.

    A 401 or a 413 for a declared Content-Length is answered without reading the body (the server
    discards what the client still sends, and the connection stays open for its next request). A body
    without Content-Length (chunked) is counted as the app reads it: past the limit, reading it raises
    ApiError(413). An exception that escapes the app before the response started gets a 500 error object
    here, so the connection stays usable (Starlette's own handler re-raises, and uvicorn then drops it)."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(headers):
            return await ApiError(401, "the API key is missing or wrong: send the header Authorization: Bearer KEY",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                                  ).response()(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return await self._too_large().response()(scope, receive, send)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise self._too_large()
            return message

        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except Exception as err:
            if started:
                raise
            if not isinstance(err, ApiError):  # a bug: say so in the log and to the client, keep serving
                traceback.print_exc(file=sys.stderr)
                err = ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
            await err.response()(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.max_request_bytes} bytes (the server's "
                             "--max-request-bytes)", code="request_too_large")


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ worker

@dataclasses.dataclass
class Job:
    """One request in flight: the scheduler's request, and the queue its response reads from."""

    loop: asyncio.AbstractEventLoop
    request: sched.Request
    cancel: Callable[[], None]  # ends the request at the scheduler's next step (a no-op once it ended)
    out: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, _DONE if item is None else item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


_DONE = object()


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        running = Gauge("qwen3moe_requests_running", "Requests holding a KV-cache row", registry=self.registry)
        running.set_function(lambda: scheduler.running)
        waiting = Gauge("qwen3moe_requests_waiting", "Requests waiting for a row", registry=self.registry)
        waiting.set_function(lambda: scheduler.queued)
        self.generated = Counter("qwen3moe_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt = Counter("qwen3moe_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.finished = Counter("qwen3moe_requests_finished", "Requests ended, by how they ended", ["reason"],
                                registry=self.registry)
        self.ttft = Histogram("qwen3moe_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.itl = Histogram("qwen3moe_inter_token_latency_seconds", "Between a request's consecutive tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=self.registry)

    def watch(self, job: Job) -> Emit:
        """The emitter of job's request: passes its events on and records them."""
        arrived, last, reason = time.perf_counter(), None, None

        def emit(item: Any) -> None:
            nonlocal last, reason
            if isinstance(item, Exception):
                reason = "error"
            elif item is None:  # the request is over: a request that ended without a last event was cancelled
                self.finished.labels(reason or "cancelled").inc()
            elif isinstance(item, Event):
                reason = item.finish_reason
                now = time.perf_counter()
                if last is None:
                    self.prompt.inc(len(job.request.prompt))
                    self.ttft.observe(now - arrived)
                else:
                    self.itl.observe(now - last)
                last = now
                self.generated.inc()
            job.put(item)

        return emit


class Worker:
    """Runs the scheduler's loop on a thread of its own, off the event loop, until stopped."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=scheduler.serve_forever, args=(self.stopped,), name="generation",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)


# ------------------------------------------------------------------------------------- tokenizer process

SHORT_TEXT_CHARS = 16_384  # tokenized in the request's thread (tens of ms at most); longer text in the child

# The child: a plain interpreter that imports only `tokenizers` (no main-module re-import, as multiprocessing's
# spawn would do, and no JAX). It reads the tokenizer's JSON, then texts, each sent as 8 bytes of length and
# UTF-8; it answers the ids as 8 bytes of length and uint32s. When the server goes, its stdin ends, and so does it.
_TOKENIZER_CHILD = """
import array, sys, tokenizers
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
def read():
    size = int.from_bytes(stdin.read(8) or bytes(8), "little")
    data = stdin.read(size)
    if not size or len(data) < size:
        sys.exit(0)
    return data.decode()
tokenizer = tokenizers.Tokenizer.from_str(read())
while True:
    ids = array.array("I", tokenizer.encode(read(), add_special_tokens=False).ids).tobytes()
    stdout.write(len(ids).to_bytes(8, "little") + ids)
    stdout.flush()
"""


class TokenizerProcess:
    """Tokenizes long texts in a child process, as Tokenizer.encode does. The tokenizers library holds the GIL
    while it encodes (3 s for 1 MB of text with a byte-level vocabulary, 1.4 s with the bundled model's), so
    in a thread it would still stall the event loop, /health included; in a child it stalls nothing. One
    child: long prompts wait for each other, short ones never wait for them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.spec = tokenizer.backend.to_str()
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None

    def encode(self, text: str) -> list[int]:
        """tokenizer.encode(text) (blocking: call it from a thread)."""
        if len(text) <= SHORT_TEXT_CHARS:
            return self.tokenizer.encode(text)
        with self.lock:
            if self.child is None or self.child.poll() is not None:  # first use, or it died: (re)start it
                self.child = subprocess.Popen([sys.executable, "-c", _TOKENIZER_CHILD], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE)
                self._send(self.spec)
            self._send(text)
            size = int.from_bytes(self.child.stdout.read(8), "little")
            ids = self.child.stdout.read(size)
            if len(ids) != size or (size == 0 and self.child.poll() is not None):
                raise RuntimeError("the tokenizer process died")
            return array.array("I", ids).tolist()

    def _send(self, text: str) -> None:
        data = text.encode()
        self.child.stdin.write(len(data).to_bytes(8, "little") + data)
        self.child.stdin.flush()


# ----------------------------------------------------------------------------------------------- the app

@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request that passed every check and can only fail now if the server does: its prompt's token ids
    and its sampling settings (stop ids resolved: the chat stop ids, or None for the model's EOS ids), and
    the scheduler's request made of them."""

    prompt: list[int]
    sampling: SamplingParams
    request: sched.Request | None = None
    reply: ReplyFormat | None = None  # chat: how the reply text becomes OpenAI's message fields


@dataclasses.dataclass(frozen=True)
class ReplyFormat:
    """How a chat reply is parsed (see tool_calls.py): `reasoning`, whether a thinking block goes to
    reasoning_content (thinking is on), and `opened`, whether the prompt opened it; `tools`, the functions
    whose <tool_call> blocks become tool_calls, by name, with their parameters schema (None: no parsing, as
    with tool_choice "none"), and `stream_arguments`, whether decoding is constrained to calls, so that their
    arguments stream as they come."""

    reasoning: bool = False
    opened: bool = False
    tools: dict[str, dict[str, Any] | None] | None = None
    stream_arguments: bool = False


# Each parameter of OpenAI's that the server does not implement, with its values that ask for nothing.
UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "echo": (False,),
               "best_of": (1,), "suffix": ("",)}


def sampling_params(model: Model, body: _Request, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(model, body, body.max_completion_tokens or body.max_tokens, logprobs)
    tools, forced = _offered_tools(body)
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
    reply = ReplyFormat(reasoning=thinking, opened=thinking and tool_calls.prompt_opens_thinking(text),
                        tools=schemas, stream_arguments=forced is not None)
    prompt = encode(text)
    params, asked_by = _constrained(model, body, params, forced, reply, len(prompt))
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
            tool_calls.parameters_validator(function.get("parameters"))
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


def _constrained(model: Model, body: ChatRequest, params: SamplingParams, forced: list[dict[str, Any]] | None,
                 reply: ReplyFormat, prompt_length: int) -> tuple[SamplingParams, str | None]:
    """(`params` with the grammar that tool_choice ("required" or a named function: `forced`) or
    response_format asks for, the parameter that asked: "tools", "response_format" or None). With thinking on,
    a thinking block of at most half the reply's tokens may come first (or must be closed first, when the
    prompt opened it), and the structure follows."""
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise ApiError(400, 'response_format of type "json_schema" needs json_schema: {"name": ..., "schema": '
                            '{...}}', "response_format", "invalid_value")
    if forced is None and not wants_json:
        return params, None
    if forced is not None and wants_json:
        raise ApiError(400, "response_format cannot constrain a reply that tool_choice makes a tool call",
                       "response_format", "invalid_value")
    limit = params.max_new_tokens or model.max_seq_len - prompt_length
    thinking = tool_calls.Thinking(reply.opened, limit // 2) if reply.reasoning else None

    def has_token(tag: str) -> bool:
        return model.tokenizer.token_id(tag) is not None

    if forced is not None:
        several = body.tool_choice == "required" and body.parallel_tool_calls
        xml = "<function=" in (model.tokenizer.chat_template or "")  # Qwen3-Coder's template asks for XML calls
        param = "tools"
        constraint = {"grammar": tool_calls.tool_call_grammar(forced, several, thinking, has_token, xml)}
    else:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
        param = "response_format"
        constraint = ({"json_schema": schema} if thinking is None else
                      {"grammar": tool_calls.json_grammar(schema, thinking, has_token)})
    try:
        return dataclasses.replace(params, **constraint), param
    except Qwen3MoeError as err:
        raise ApiError(400, f"{param}: {err}", param, "invalid_value") from err


def prepare_completion(model: Model, body: CompletionRequest, encode: Encode) -> Prepared:
    """The tokenizer (`encode`) over the prompt, or its token ids as given, and every check (blocking: run it
    in a thread)."""
    params = sampling_params(model, body, body.max_tokens, body.logprobs)
    if isinstance(body.prompt, list):
        return _checked(model, body.prompt, params, "prompt")
    if model.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", "prompt", "invalid_value")
    return _checked(model, encode(body.prompt), params, "prompt")


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


def create_app(model: Model, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The server's app over model's scheduler, whose loop runs while the app does. With api_key, every /v1
    route needs `Authorization: Bearer api_key`; /health, /metrics and /openapi.json stay open. Bodies over
    max_request_bytes get 413. max_queue bounds the requests waiting for a KV-cache row (None: the
    scheduler's own setting); on_shutdown runs after the loop stops."""
    scheduler = model.scheduler
    if max_queue is not None:
        scheduler.max_queue = max_queue
    metrics = Metrics(scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker = Worker(scheduler)
        yield
        worker.stop()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="qwen3moe-jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.router.route_class = _JsonRoute
    app.add_middleware(_Gate, api_key=api_key, max_request_bytes=max_request_bytes)
    encoder = TokenizerProcess(model.tokenizer) if model.tokenizer is not None else None
    encode = encoder.encode if encoder is not None else model.encode
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        # Of a union's errors (one per member), the one that got furthest into the value says most: the deepest,
        # and not a mere "not this type" when another member's type matched.
        first = max(err.errors(), key=lambda e: (len(e["loc"]), not _is_type_mismatch(e["type"])))
        # pydantic's location also names the union member it tried ("str", "list[ContentPart]"): drop those.
        location = [str(part) for part in first["loc"][1:]
                    if isinstance(part, int) or (part.isidentifier() and part not in _TYPE_NAMES)]
        param = ".".join(location) or None
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # _Gate answers first; this is a backstop
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:  # 404 and 405 of the router
        return ApiError(err.status_code, str(err.detail), headers=err.headers).response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ready", "model": model_name}  # the app only starts serving once compiled

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "qwen3moe-jax"}]}

    def check_model(requested: str) -> None:
        if requested != model_name:
            raise ApiError(404, f"the model {requested[:200]!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def start(prepared: Prepared) -> Job:
        request = prepared.request
        job = Job(asyncio.get_running_loop(), request, lambda: scheduler.cancel(request))
        request.emit = metrics.watch(job)
        try:
            scheduler.submit(request)
        except QueueFull as err:
            raise ApiError(503, f"the server is busy: {err}; retry shortly", kind="server_error",
                           code="server_busy", headers={"Retry-After": "1"}) from err
        return job

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        prepared = await run_in_threadpool(prepare_chat, model, body, encode)
        job = start(prepared)
        return await _respond(job, body, request, chat=True, name=model_name, tokenizer=model.tokenizer,
                              reply=prepared.reply)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        job = start(await run_in_threadpool(prepare_completion, model, body, encode))
        return await _respond(job, body, request, chat=False, name=model_name, tokenizer=model.tokenizer)

    return app


def _is_type_mismatch(error_type: str) -> bool:
    return error_type.endswith("_type") or error_type in ("none_required", "literal_error", "is_instance_of")


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


# ------------------------------------------------------------------------------------------- responses

async def _events(job: Job) -> AsyncIterator[Event]:
    """The job's events as they arrive (a streaming response that ends early cancels the job: see _sse)."""
    while (item := await job.out.get()) is not _DONE:
        if isinstance(item, Exception):
            raise item
        yield item


async def _respond(job: Job, body: _Request, request: Request, chat: bool, name: str, tokenizer,
                   reply: ReplyFormat | None = None):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shape = _Shape(request_id, name, chat, tokenizer, reply or ReplyFormat())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(shape, job, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        events = [event async for event in _events(job)]
    except Exception as err:
        return ApiError(500, f"generation failed: {err}", kind="server_error").response()
    finally:
        watcher.cancel()
    if not events:  # cancelled before it started: its client has gone, so nobody reads this
        return ApiError(400, "the request was cancelled", code="cancelled").response()
    return shape.whole(events)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when its client goes away. The body has been read, so the next ASGI message is
    http.disconnect: the client closed the connection (or the response went out, and this was cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _sse(shape: _Shape, job: Job, include_usage: bool) -> AsyncIterator[str]:
    """The response body of a streaming request. Starlette stops iterating it when the client has gone
    (a send fails, or its disconnect listener fires); the finally clause then cancels the job."""

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        parser, calls = shape.parser(), 0
        if shape.chat:  # the first chunk carries the role
            yield data(shape.chunk({"role": "assistant", "content": ""}, None, include_usage))
        async for event in _events(job):
            if not shape.chat:
                if event.text or event.logprobs is not None:
                    yield data(shape.chunk(event.text, None, include_usage, event))
            else:  # the text parsed as it comes: reasoning, content, and tool calls as OpenAI streams them
                for final in (False, True) if event.finish_reason is not None else (False,):
                    reasoning, content, call_deltas = parser.feed("" if final else event.text, final)
                    delta = {"reasoning_content": reasoning} if reasoning else {}
                    delta |= {"content": content} if content else {}
                    with_logprobs = not final and event.logprobs is not None
                    if delta or with_logprobs:
                        yield data(shape.chunk(delta, None, include_usage, event if with_logprobs else None))
                    for call_delta in call_deltas:  # a call's id and name, then pieces of its arguments
                        yield data(shape.chunk({"tool_calls": [call_delta.openai()]}, None, include_usage))
                        calls += call_delta.call is not None
            if event.finish_reason is not None:
                yield data(shape.chunk({} if shape.chat else "", shape.finish_reason(event.finish_reason, calls),
                                       include_usage))
                if include_usage:
                    yield data(shape.usage_chunk(event.usage))
    except Exception as err:  # after the headers went out, an error can only travel in the stream
        yield data({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None,
                              "code": None}})
    finally:
        job.cancel()  # a no-op once the request ended
    yield "data: [DONE]\n\n"


@dataclasses.dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    tokenizer: Any
    reply: ReplyFormat = dataclasses.field(default_factory=ReplyFormat)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def parser(self) -> tool_calls.ReplyParser:
        return tool_calls.ReplyParser(self.reply.reasoning, self.reply.opened, self.reply.tools,
                                      self.reply.stream_arguments)

    @staticmethod
    def finish_reason(reason: str | None, calls: int) -> str:
        finish = FINISH_REASONS.get(reason, "stop")
        return "tool_calls" if calls and finish == "stop" else finish

    def message(self, text: str) -> tuple[dict[str, Any], int]:
        """The chat message of a whole reply, and how many tool calls it holds."""
        reasoning, content, call_deltas = self.parser().feed(text, final=True)
        calls = tool_calls.joined(call_deltas)
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
            "choices": [], "usage": _usage(usage)}

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
            "choices": [choice], "usage": _usage(last.usage)}

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


def _usage(usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def serve(model: Model, model_name: str, host: str, port: int, warmup_tokens: int, api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int | None = None) -> None:
    """Compile for prompts up to warmup_tokens (every prefill chunk shape they use) and decode, then serve
    (see create_app for api_key, max_request_bytes and max_queue).
    Under multi-host every process warms up alike; process 0 serves and the others follow its steps."""
    import jax
    import uvicorn

    from qwen3moe_jax import multihost
    from qwen3moe_jax.compile_cache import CacheLookups

    leader = jax.process_index() == 0
    if leader and api_key is None and not is_loopback(host):
        print(f"[warning: binding {host}, which other machines can reach, without an API key: anyone who reaches "
              "the port can use the model; set QWEN3MOE_JAX_API_KEY or --api-key]", file=sys.stderr, flush=True)
    start = time.perf_counter()
    steps = model.engine.warmup_steps(warmup_tokens, None, all_buckets=True)
    for i, (what, compile_step) in enumerate(steps):
        if leader:
            print(f"[compile {i + 1}/{len(steps)}] {what} ...", end="", file=sys.stderr, flush=True)
        step_start = time.perf_counter()
        with CacheLookups() as lookups:
            compile_step()
        if leader:
            print(f" {time.perf_counter() - step_start:.1f}s{lookups.summary()}", file=sys.stderr, flush=True)
    if not leader:
        multihost.follow(model.engine)
        return
    print(f"[compiled in {time.perf_counter() - start:.1f}s; serving {model_name!r} on http://{host}:{port} "
          f"with up to {model.max_batch} requests per decode step]", file=sys.stderr, flush=True)
    on_shutdown = None
    if jax.process_count() > 1:
        def stop_serving() -> None:
            # A follower that died failed the step in flight (its requests get the error). SIGTERM stops
            # uvicorn as it would any other time, answering what is in flight; the process then ends by it.
            print(f"[stopping: a follower process is gone ({leader_of.lost})]", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

        leader_of = multihost.Leader(model.engine, stop_serving)
        model.scheduler.call = leader_of.call
        on_shutdown = leader_of.shutdown  # in the app's shutdown: uvicorn re-raises SIGTERM once run() returns
    app = create_app(model, model_name, api_key, max_request_bytes, max_queue, on_shutdown)
    uvicorn.run(app, host=host, port=port, log_level="warning")
