"""An OpenAI-compatible demo server (CONTRACTS.md, Server): /v1/chat/completions and /v1/completions,
streamed as server-sent events or returned whole, /v1/models, /health and /metrics.

    qwen3moe-jax serve --model FILE.gguf --port 8000

How a request runs: the handler validates it (pydantic models below, then SamplingParams and the
engine's checks), so a bad request gets an OpenAI-style error before anything is queued. The checked
request goes to the model's scheduler (scheduler.py), whose loop runs on one thread of its own (`Worker`):
up to --max-batch requests share each decode step, and up to --max-queue wait for a row; beyond that a
request gets 503 with Retry-After. The loop passes each event to the request's asyncio queue; the response
reads from it. When a client goes away, the response cancels its request, whose row is freed at the next
step without disturbing the others. /metrics serves Prometheus text (prometheus_client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from qwen3moe_jax import scheduler as sched
from qwen3moe_jax.api import Model
from qwen3moe_jax.errors import ContextLengthError, Qwen3MoeError
from qwen3moe_jax.generation import Event
from qwen3moe_jax.sampling import SamplingParams
from qwen3moe_jax.scheduler import Emit, QueueFull, Scheduler

FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length",
                  "cache_full": "length"}


# ---------------------------------------------------------------------------------------------- requests

class _Request(BaseModel):
    """Fields shared by both endpoints. Strict: a string where a number belongs is an error, as at OpenAI.
    Unknown fields are ignored, so clients that send more of OpenAI's API still work."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: 0 or -1 is off")
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, description="extension, llama.cpp/vLLM style")
    repeat_last_n: int = Field(64, ge=0, description="extension: the penalty's window")
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, reasoning_content... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # extension, e.g. {"enable_thinking": false}
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "union"}
_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


# ------------------------------------------------------------------------------------------------ worker

@dataclasses.dataclass
class Job:
    """One request in flight: the scheduler's request, and the queue its response reads from."""

    loop: asyncio.AbstractEventLoop
    request: sched.Request
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


# ----------------------------------------------------------------------------------------------- the app

def create_app(model: Model, model_name: str, max_queue: int | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The app over model's scheduler, whose loop runs while the app does; max_queue bounds the requests
    waiting for a KV-cache row (None: the scheduler's own setting); on_shutdown runs after the loop stops."""
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
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        # pydantic's location also names the union member it tried ("str", "list[ContentPart]"): drop those.
        location = [str(part) for part in first["loc"][1:]
                    if isinstance(part, int) or (part.isidentifier() and part not in _TYPE_NAMES)]
        param = ".".join(location) or None
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # a bug: say so, keep serving
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail), code=None).response()

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
            raise ApiError(404, f"the model {requested!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def sampling(body: _Request, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > 4:
            raise ApiError(400, "stop takes at most 4 sequences", "stop", "invalid_value")
        try:
            return SamplingParams(
                temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                repeat_penalty=body.repetition_penalty, repeat_last_n=body.repeat_last_n,
                seed=secrets.randbelow(2**32) if body.seed is None else body.seed,  # no seed: a fresh draw
                max_new_tokens=max_tokens, stop=tuple(stop), logprobs=logprobs,
            )
        except Qwen3MoeError as err:
            raise ApiError(400, str(err), code="invalid_value") from err

    async def start(prompt: str | list[int], params: SamplingParams, param: str) -> Job:
        try:
            job = Job(asyncio.get_running_loop(), model.request(prompt, params))
        except ContextLengthError as err:
            raise ApiError(400, str(err), param, "context_length_exceeded") from err
        except Qwen3MoeError as err:
            raise ApiError(400, str(err), param, "invalid_value") from err
        job.request.emit = metrics.watch(job)
        try:
            scheduler.submit(job.request)
        except QueueFull as err:
            raise ApiError(503, f"the server is busy: {err}; retry shortly", kind="server_error",
                           code="server_busy", headers={"Retry-After": "1"}) from err
        return job

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        if model.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template: use /v1/completions with "
                           "token ids", "messages", "invalid_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, body.max_completion_tokens or body.max_tokens, logprobs)
        try:
            prompt, params = model.prepare_chat([_message_dict(m) for m in body.messages], params,
                                                tools=body.tools, **(body.chat_template_kwargs or {}))
        except Qwen3MoeError as err:
            raise ApiError(400, str(err), "messages", "invalid_value") from err
        except TypeError as err:  # a chat_template_kwargs key that clashes with the template's own arguments
            raise ApiError(400, str(err), "chat_template_kwargs", "invalid_value") from err
        job = await start(prompt, params, "messages")
        return await _respond(job, body, chat=True, name=model_name, tokenizer=model.tokenizer, scheduler=scheduler)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        params = sampling(body, body.max_tokens, body.logprobs)
        job = await start(body.prompt, params, "prompt")
        return await _respond(job, body, chat=False, name=model_name, tokenizer=model.tokenizer, scheduler=scheduler)

    return app


def _message_dict(message: Message) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):  # text parts, joined as OpenAI's own models read them
        out["content"] = "".join(part.text for part in message.content)
    return out


# ------------------------------------------------------------------------------------------- responses

async def _events(job: Job) -> AsyncIterator[Event]:
    """The job's events as they arrive (a streaming response that ends early cancels the job: see _sse)."""
    while (item := await job.out.get()) is not _DONE:
        if isinstance(item, Exception):
            raise item
        yield item


async def _respond(job: Job, body: _Request, chat: bool, name: str, tokenizer, scheduler: Scheduler):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shape = _Shape(request_id, name, chat, tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(shape, job, include_usage, scheduler), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = []
    try:
        events = [event async for event in _events(job)]
    except Exception as err:
        return ApiError(500, f"generation failed: {err}", kind="server_error").response()
    finally:
        scheduler.cancel(job.request)  # a no-op once it ended; frees the row if the handler was cancelled
    return shape.whole(events)


async def _sse(shape: _Shape, job: Job, include_usage: bool, scheduler: Scheduler) -> AsyncIterator[str]:
    """The response body of a streaming request. Starlette stops iterating it when the client has gone
    (a send fails, or its disconnect listener fires); the finally clause then cancels the job."""

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if shape.chat:  # the first chunk carries the role
            yield data(shape.chunk({"role": "assistant", "content": ""}, None, include_usage))
        async for event in _events(job):
            if event.text or event.logprobs is not None:
                yield data(shape.chunk(shape.delta(event), None, include_usage, event))
            if event.finish_reason is not None:
                yield data(shape.chunk({} if shape.chat else "", FINISH_REASONS[event.finish_reason], include_usage))
                if include_usage:
                    yield data(shape.usage_chunk(event.usage))
    except Exception as err:  # after the headers went out, an error can only travel in the stream
        yield data({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None,
                              "code": None}})
    finally:
        scheduler.cancel(job.request)  # a no-op once the request ended
    yield "data: [DONE]\n\n"


@dataclasses.dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    tokenizer: Any
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def delta(self, event: Event) -> dict[str, str] | str:
        return {"content": event.text} if self.chat else event.text

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
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH_REASONS.get(last.finish_reason, "stop"),
                                  "logprobs": logprobs}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
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


def serve(model: Model, model_name: str, host: str, port: int, warmup_tokens: int,
          max_queue: int | None = None) -> None:
    """Compile for prompts up to warmup_tokens (every prefill chunk shape they use) and decode, then serve.
    Under multi-host every process warms up alike; process 0 serves and the others follow its steps."""
    import jax
    import uvicorn

    from qwen3moe_jax import multihost

    leader = jax.process_index() == 0
    start = time.perf_counter()
    if leader:
        print(f"[compiling prefill for prompts of up to {warmup_tokens} tokens, and decode]", file=sys.stderr,
              flush=True)
    model.engine.warmup(warmup_tokens, None, all_buckets=True)
    if not leader:
        multihost.follow(model.engine)
        return
    print(f"[compiled in {time.perf_counter() - start:.1f}s; serving {model_name!r} on http://{host}:{port} "
          f"with up to {model.max_batch} requests per decode step]", file=sys.stderr, flush=True)
    on_shutdown = None
    if jax.process_count() > 1:
        model.scheduler.call = multihost.leader_call(model.engine)
        on_shutdown = multihost.shutdown  # in the app's shutdown: uvicorn re-raises SIGTERM once run() returns
    uvicorn.run(create_app(model, model_name, max_queue, on_shutdown), host=host, port=port, log_level="warning")
