"""The OpenAI-compatible server's app and routes (CONTRACTS.md, Server): /v1/chat/completions and /v1/completions,
streamed as server-sent events or returned whole, /v1/models, /health and /metrics; and `serve`, which compiles
and then runs it.

    qwen3moe-jax serve --model FILE.gguf --port 8000 [--api-key KEY] [--max-request-bytes N]

How a request runs, and where each bad request is turned away (always with OpenAI's error object, and
always before a response starts, so a streaming request with bad parameters gets a 4xx, not a 200):
  1. `Gate` (http.py), an ASGI middleware around the app: 401 for a /v1 route without the API key (when the
     server has one); 413 when Content-Length exceeds max_request_bytes (nothing of the body is read), or
     when a chunked body grows past it while read; and a 500 error object for an exception nothing else
     caught, with the connection kept open.
  2. `JsonRoute` (http.py), the routes' class: 400 unless Content-Type is JSON; the body is parsed by
     `parse_json` (in a worker thread): UTF-8, JSON, no NaN/Infinity or number past float range, no lone
     UTF-16 surrogate in any string or key, nesting at most MAX_JSON_DEPTH deep.
  3. pydantic models (schemas.py: `ChatRequest`, `CompletionRequest`): types and ranges; they are also what
     /openapi.json describes.
  4. The handler: the model name (404), then `prepare_chat` / `prepare_completion` (prepare.py) in a worker
     thread: sampling settings (which also refuses OpenAI parameters the server does not implement), the
     chat template, the tokenizer (texts over SHORT_TEXT_CHARS go to `TokenizerProcess`, a child process,
     since the tokenizer holds the GIL), token ids against the vocabulary and prompt + max_tokens against
     the KV cache. The result, a `Prepared` request (token ids + SamplingParams), cannot fail on its input
     any more.
  5. `start` submits it to the model's scheduler (runtime/scheduler.py), whose loop runs on a thread of its
     own (`Worker`, jobs.py): up to --max-batch requests share each decode step, and up to --max-queue wait
     for a row; beyond that a request gets 503 with Retry-After. The loop passes each event to the job's
     asyncio queue; the response (stream.py) reads from it. A completion of a list of prompts is a request
     (and a job) per prompt, answered together, a choice each.
A chat reply is parsed as it comes (reply.py's ReplyParser, set up by the request's ReplyFormat): a leading
thinking block goes to reasoning_content and <tool_call> blocks to tool_calls; tool_choice "required" or a
named function, and response_format, constrain decoding with a grammar (grammars.py).
A job is cancelled (its request leaves the scheduler at the next step, freeing its row without disturbing
the others) when its client goes away: for a streaming response Starlette stops the body iterator (see
stream.sse); for a whole response `stream.respond` waits for the ASGI http.disconnect message beside the events.
/metrics serves Prometheus text (prometheus_client), from a registry of each app's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from qwen3moe_jax.api import Model
from qwen3moe_jax.errors import ConfigError, Qwen3MoeError
from qwen3moe_jax.runtime.scheduler import QueueFull
from qwen3moe_jax.serve.http import DEFAULT_MAX_REQUEST_BYTES, ApiError, Gate, JsonRoute, is_loopback, validation_error
from qwen3moe_jax.serve.jobs import Job, Worker
from qwen3moe_jax.serve.metrics import Metrics
from qwen3moe_jax.serve.prepare import Prepared, prepare_chat, prepare_completion
from qwen3moe_jax.serve.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qwen3moe_jax.serve.stream import respond
from qwen3moe_jax.serve.tokenizer_process import TokenizerProcess


def create_app(model: Model, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The server's app over model's scheduler, whose loop runs while the app does. With api_key, every /v1
    route needs `Authorization: Bearer api_key`; /health, /metrics and /openapi.json stay open. Bodies over
    max_request_bytes get 413. max_queue bounds the requests waiting for a KV-cache row (None: the
    scheduler's own setting); on_shutdown runs after the loop stops."""
    scheduler = model.scheduler
    if max_queue is not None:
        if max_queue < 0:
            raise ConfigError(f"max_queue must be 0 or more, got {max_queue}")
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
    app.router.route_class = JsonRoute
    app.add_middleware(Gate, api_key=api_key, max_request_bytes=max_request_bytes)
    encoder = TokenizerProcess(model.tokenizer) if model.tokenizer is not None else None
    encode = encoder.encode if encoder is not None else model.encode
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # Gate answers first; this is a backstop
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
        return await respond([job], body, request, chat=True, name=model_name, tokenizer=model.tokenizer,
                              reply=prepared.reply)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prepared = await run_in_threadpool(prepare_completion, model, body, encode)
        if body.stream and len(prepared) > 1:
            raise ApiError(400, "stream takes one prompt: send a list of prompts without stream", "stream",
                           "invalid_value")
        jobs: list[Job] = []
        try:
            for one in prepared:
                jobs.append(start(one))
        except ApiError:  # the queue filled up part-way: the prompts already queued leave with the refusal
            for job in jobs:
                job.cancel()
            raise
        return await respond(jobs, body, request, chat=False, name=model_name, tokenizer=model.tokenizer,
                              echoes=[p.prompt if p.echo else None for p in prepared])

    add_tokenizer_routes(app, model, encode)
    return app


def add_tokenizer_routes(app: FastAPI, model: Model, encode: Callable[[str], list[int]]) -> None:
    """vLLM's tokenizer routes, with which clients count and split tokens as the server does (lm-evaluation-harness's
    local-completions finds them and needs no tokenizer of its own): POST /tokenize {"prompt"} -> {"tokens"},
    POST /detokenize {"tokens"} -> {"prompt"}, GET /tokenizer_info."""

    def tokenizer() -> Any:
        if model.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer", code="invalid_value")
        return model.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tokenizer()
        tokens = await run_in_threadpool(encode, body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        try:
            model.engine.check_tokens(body.tokens)
        except Qwen3MoeError as err:
            raise ApiError(400, str(err), "tokens", "invalid_value") from err
        return {"prompt": tokenizer().decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        info = tokenizer()
        return {"bos_token": info.bos_token, "eos_token": info.eos_token, "pad_token": None,
                "model_max_length": model.max_seq_len, "vocab_size": model.config.vocab_size}


def serve(model: Model, model_name: str, host: str, port: int, warmup_tokens: int, api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int | None = None) -> None:
    """Compile for prompts up to warmup_tokens (every prefill chunk shape they use) and decode, then serve
    (see create_app for api_key, max_request_bytes and max_queue).
    Under multi-host every process warms up alike; process 0 serves and the others follow its steps."""
    import jax
    import uvicorn

    from qwen3moe_jax.runtime import multihost
    from qwen3moe_jax.runtime.compile_cache import CacheLookups

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
