"""A request's events as its HTTP response: server-sent events as they come (`sse`, SSE-1), or one JSON object once
the request has ended (SSE-2); either way the job is cancelled when its client goes away (SSE-4)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwen3moe_jax.runtime.generation import Event
from qwen3moe_jax.serve.http import ApiError
from qwen3moe_jax.serve.jobs import Job
from qwen3moe_jax.serve.reply import ReplyFormat
from qwen3moe_jax.serve.responses import ResponseShape
from qwen3moe_jax.serve.schemas import BaseRequest


async def respond(jobs: list[Job], body: BaseRequest, request: Request, chat: bool, name: str, tokenizer,
                  reply: ReplyFormat | None = None, echoes: list[list[int] | None] | None = None):
    """The response to `body` from its jobs' events (one job, or a completion's for each of its prompts, in order):
    an SSE stream when the body asks for one (one job), else the whole reply once every request has ended.
    echoes: per job, the prompt tokens a completion echoes (None: it does not)."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    asked = bool(body.logprobs) if chat else body.logprobs is not None
    shape = ResponseShape(request_id, name, chat, tokenizer, reply or ReplyFormat(), logprobs=asked)
    echoes = echoes or [None] * len(jobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(shape, jobs[0], include_usage, echoes[0]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs))
    try:
        runs = await asyncio.gather(*(_collect(job) for job in jobs))
    except Exception as err:
        return ApiError(500, f"generation failed: {err}", kind="server_error").response()
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()  # a no-op once its request ended (another one's failure ends them all)
    if any(not events or events[-1].finish_reason is None for events in runs):
        # It ended without a last event: cancelled, because its client left. Nobody reads this answer.
        return ApiError(400, "the request was cancelled", code="cancelled").response()
    return shape.whole_of(list(runs), echoes)


async def _cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Cancel the jobs when their client goes away. The body has been read, so the next ASGI message is
    http.disconnect: the client closed the connection (or the response went out, and this was cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancel()


async def _collect(job: Job) -> list[Event]:
    return [event async for event in job.events()]


async def sse(shape: ResponseShape, job: Job, include_usage: bool, echo: list[int] | None = None
              ) -> AsyncIterator[str]:
    """The response body of a streaming request. Starlette stops iterating it when the client has gone
    (a send fails, or its disconnect listener fires); the finally clause then cancels the job."""

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        parser, calls = shape.parser(), 0
        if shape.chat:  # the first chunk carries the role
            yield data(shape.chunk({"role": "assistant", "content": ""}, None, include_usage))
        async for event in job.events():
            if echo is not None:  # the prompt, and its logprobs, before the first token
                yield data(shape.echo_chunk(echo, event, include_usage))
                echo = None
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
