"""Fault injection into a running server: one request's failure stays its own. A grammar that raises, a failure
while a prompt's chunk is prepared or a token is taken, a tokenizer process that dies: the request at fault gets
OpenAI's error object (or an SSE error event), every other client gets exactly what it gets alone, and the server
keeps serving. A failed device step ends what runs, says so in the log and in each error, and the next requests
are served as if nothing had happened.

The server runs in this process (uvicorn on a loopback port, on a thread), so that faults can be put into it."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

import qwen3moe_jax as qj
from qwen3moe_jax.api import Model
from qwen3moe_jax.serve import app as app_module
from qwen3moe_jax.serve import tokenizer_process
from qwen3moe_jax.serve.app import create_app

VICTIM_SEED = 666
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "word": {"type": "string", "maxLength": 12}},
          "required": ["n", "word"]}


@pytest.fixture(scope="module")
def model():
    return qj.random_model("tiny", std=0.2, max_seq_len=256, max_batch=4)


@contextlib.contextmanager
def serving(model: Model) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_app(model, "tiny"), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chat(url: str, seed: int, constrained: bool, stream: bool = False, max_tokens: int = 48) -> tuple[int, str]:
    """(status, what came back: the message's content and finish reason, or the error's message; for a stream,
    the joined content deltas, the last finish reason and any error event's message)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"count to {seed}"}], "seed": seed,
            "temperature": 1.0, "max_tokens": max_tokens, "stream": stream,
            "chat_template_kwargs": {"enable_thinking": False}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    if not stream:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        data = reply.json()
        if "error" in data:
            return reply.status_code, "error: " + data["error"]["message"]
        choice = data["choices"][0]
        return reply.status_code, f"{choice['message']['content']} [{choice['finish_reason']}]"
    text, finish, errors = [], None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                errors.append(chunk["error"]["message"])
                continue
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return reply.status_code, f"{''.join(text)} [{finish}]" + "".join(f" error: {e}" for e in errors)


def together(url: str, victim: Callable[[], Any] | None = None) -> tuple[list[tuple[int, str]], Any]:
    """Two bystanders (one free, one constrained to SCHEMA) and, a moment after them, the victim's call, all at
    once; the bystanders' replies and what the victim's call returned."""
    results: dict[str, Any] = {}
    calls = {"free": lambda: chat(url, 1, False), "json": lambda: chat(url, 2, True), "victim": victim}
    threads = [threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, c()))
               for n, c in calls.items() if c is not None]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    return [results["free"], results["json"]], results.get("victim")


def paced(model: Model, monkeypatch, fail_when: Callable[[dict], bool] = lambda step: False) -> None:
    """Each decode block of `model`'s scheduler takes 15 ms more, so that requests started 50 ms apart overlap (the
    tiny model's blocks take about 1 ms); a block for which fail_when(its arguments) holds raises instead."""
    engine = model.scheduler.engine

    def call(op: str, **kwargs: Any):
        if op == "decode":
            time.sleep(0.015)
            if fail_when(kwargs):
                raise RuntimeError("injected device failure")
        return engine.call(op, **kwargs)

    monkeypatch.setattr(model.scheduler, "call", call)


@pytest.fixture(scope="module")
def alone(model):
    """What each bystander gets with nothing else running."""
    with serving(model) as url:
        return [chat(url, 1, False), chat(url, 2, True)]


class _Failing:
    """A request's Constraint or RequestEvents that raises at its `at`-th call of `method`, noting how many
    requests held a row then."""

    def __init__(self, inner, method: str, at: int, model: Model):
        self._inner, self._method, self._at, self._calls, self._model = inner, method, at, 0, model
        self.running_at_failure: int | None = None

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name != self._method:
            return value

        def failing(*args, **kwargs):
            self._calls += 1
            if self._calls == self._at:
                self.running_at_failure = self._model.scheduler.running
                raise RuntimeError(f"injected failure in {self._method}")
            return value(*args, **kwargs)

        return failing


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("where", ["grammar in a decode block", "preparing the last prompt chunk", "taking a token"])
def test_a_failure_of_one_request_is_its_own(model, alone, monkeypatch, caplog, where, stream):
    """The victim's grammar raises inside a decode block (on its 3rd token), or while its last prompt chunk is
    prepared (its first mask), or while its 3rd token is taken (its events): the victim alone ends, with the
    error; the bystanders' replies are those they get alone; the server serves the next request."""
    method, at, target = {"grammar in a decode block": ("take", 3, "constraint"),
                          "preparing the last prompt chunk": ("mask", 1, "constraint"),
                          "taking a token": ("push", 3, "events")}[where]
    make_request = Model.request
    faults = []

    def request(self, ids, sampling, on_token=None):
        made = make_request(self, ids, sampling, on_token)
        if sampling.seed == VICTIM_SEED:
            faults.append(_Failing(getattr(made, target), method, at, model))
            setattr(made, target, faults[-1])
        return made

    monkeypatch.setattr(Model, "request", request)
    paced(model, monkeypatch)
    with serving(model) as url, caplog.at_level(logging.ERROR):
        bystanders, (status, victim) = together(url, lambda: chat(url, VICTIM_SEED, True, stream))
        assert bystanders == alone
        assert f"error: generation failed: injected failure in {method}" in victim
        assert status == (200 if stream else 500)
        assert chat(url, 1, False) == alone[0]  # still serving
    assert faults[0].running_at_failure == 3  # the bystanders held their rows when it failed
    assert f"injected failure in {method}" in caplog.text


def test_a_failed_device_step_ends_what_runs_says_so_and_the_server_serves_on(model, alone, monkeypatch, caplog):
    """The first decode block that runs both bystanders raises (as a device would): both end with an error that
    says the device step failed and the KV cache was reset, the log says so too, and the requests after it get
    exactly what they get alone."""
    failed = []

    def both_running(step: dict) -> bool:
        if sum(step["active"]) == 2 and not failed:
            failed.append(step)
            return True
        return False

    paced(model, monkeypatch, both_running)
    with serving(model) as url, caplog.at_level(logging.ERROR):
        bystanders, _ = together(url)
        for status, reply in bystanders:
            assert status == 500
            assert "the device step (decode) failed: RuntimeError: injected device failure" in reply
            assert "the KV cache was reset" in reply
        assert together(url)[0] == alone
    assert "injected device failure" in caplog.text and "KV cache was reset" in caplog.text


def test_a_tokenizer_process_that_dies_is_replaced_and_one_that_keeps_dying_fails_only_its_request(model, alone,
                                                                                                monkeypatch):
    """Prompts past SHORT_TEXT_CHARS are tokenized in a child process. Killed between requests, it is replaced and
    the next long prompt gets the tokens it gets in this process; a child that dies on every text gets its
    request a 503 naming the tokenizer (never a misleading 400 for an empty prompt), and the other clients and
    later requests are served as ever."""
    children = []

    class Recorded(tokenizer_process.TokenizerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            children.append(self)

    monkeypatch.setattr(app_module, "TokenizerProcess", Recorded)
    prompt = "def f(x):\n    return x + 1\n" * 700  # 19,600 characters
    # The prompt outgrows the tiny cache: the 400 that says so counts its tokens, which shows how it was tokenized.
    expected = f"prompt ({len(model.encode(prompt))} tokens) + max_new_tokens (4)"

    def long_completion(url: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 1.0, "seed": 3})

    def tokenized_as_here(reply: httpx.Response) -> bool:
        return reply.status_code == 400 and expected in reply.json()["error"]["message"]

    with serving(model) as url:
        assert tokenized_as_here(long_completion(url))
        children[0].child.kill()
        children[0].child.wait()
        assert tokenized_as_here(long_completion(url))  # by a fresh child
        monkeypatch.setattr(tokenizer_process, "_TOKENIZER_CHILD", "import sys; sys.stdin.buffer.read(8); sys.exit(3)")
        children[0]._stop_child()
        bystanders, refused = together(url, lambda: long_completion(url))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "tokenizer_unavailable"
        assert "the tokenizer process died (exit status 3)" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == "1"
        assert bystanders == alone  # short prompts never needed the child
        monkeypatch.undo()
        assert tokenized_as_here(long_completion(url))


def test_a_tokenizer_process_that_does_not_answer_is_given_up_on_at_its_deadline(model):
    process = tokenizer_process.TokenizerProcess(model.tokenizer, timeout_s=1.0)
    process.spec = "x"  # the child below never answers whatever it is sent
    original = tokenizer_process._TOKENIZER_CHILD
    try:
        tokenizer_process._TOKENIZER_CHILD = "import time; time.sleep(60)"
        start = time.perf_counter()
        with pytest.raises(tokenizer_process.TokenizerUnavailable, match="did not answer within 1 s"):
            process.encode("x" * (tokenizer_process.SHORT_TEXT_CHARS + 1))
        assert time.perf_counter() - start < 10
        assert process.child is None  # killed, not left behind
    finally:
        tokenizer_process._TOKENIZER_CHILD = original
