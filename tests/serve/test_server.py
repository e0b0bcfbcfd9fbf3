"""The OpenAI-compatible server (SSE-1..5 of CONTRACTS.md), run for real: a subprocess on a free loopback
port serving the tiny preset, called with the `openai` client and with httpx."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import qwen3moe_jax as qj
from tests.server_process import running_server

MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def server():
    with running_server("--max-seq-len", str(MAX_SEQ_LEN), "--warmup-tokens", "32") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local():
    """The same weights in this process (the CLI's preset init), as the reference for what the server says."""
    return qj.random_model("tiny", std=0.2, max_seq_len=MAX_SEQ_LEN, max_batch=8)  # the server's --max-batch


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ready", "model": "tiny"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def _timed_chat_stream(client, **kwargs):
    start = time.perf_counter()
    chunks, times = [], []
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kwargs):
        chunks.append(chunk)
        times.append(time.perf_counter() - start)
    return chunks, times


def test_sse1_sse3_chunks_arrive_as_tokens_are_made_and_join_to_the_whole_reply(client):
    messages = [{"role": "user", "content": "Tell me about mixtures of experts."}]
    kwargs = dict(messages=messages, max_tokens=96, temperature=0.8, top_p=0.95, seed=5,
                  extra_body={"repetition_penalty": 1.1})
    _timed_chat_stream(client, **kwargs)  # compiles prefill for this prompt's length bucket
    chunks, times = _timed_chat_stream(client, **kwargs)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [(c.choices[0].delta.content, t) for c, t in zip(chunks, times, strict=True)
               if c.choices and c.choices[0].delta.content]
    streamed = "".join(text for text, _ in content)
    whole = client.chat.completions.create(model="tiny", **kwargs)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # Incremental: the text arrives over the generation (most of the request's time is decoding), not in
    # one burst at its end.
    arrivals = [t for _, t in content]
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] > 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    print(f"SSE-3: {len(chunks)} chunks, time to first chunk {times[0] * 1e3:.0f} ms, median gap between "
          f"chunks {statistics.median(gaps) * 1e3:.1f} ms, max {max(gaps) * 1e3:.1f} ms")
    assert statistics.median(gaps) < 0.5


def test_sse2_whole_responses_have_openai_shape_and_the_models_tokens(client, server, local):
    reply = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                      logprobs=2)
    expected = local.complete("def add(a, b):", 12, stop_token_ids=local.config.eos_token_ids, logprobs=2)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.text == expected.text
    assert choice.finish_reason == {"eos": "stop", "max_new_tokens": "length"}[expected.finish_reason]
    assert reply.usage.prompt_tokens == len(local.encode("def add(a, b):"))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)

    body = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5,
        "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    steps = body["choices"][0]["logprobs"]["content"]
    assert len(steps) == body["usage"]["completion_tokens"] <= 5
    assert all(len(step["top_logprobs"]) == 2 and step["logprob"] <= 0 for step in steps)


def test_usage_chunk_and_done_marker(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={
            "model": "tiny", "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 4
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def _metrics(url: str) -> dict[str, float]:
    """/metrics (Prometheus text) as {name or name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sample.labels.items()): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_sse4_a_client_that_leaves_stops_generation(server):
    before = _metrics(server)
    cancelled = "qwen3moe_requests_finished_total{reason=cancelled}"
    with httpx.stream("POST", f"{server}/v1/completions", json={
            "model": "tiny", "prompt": "a", "max_tokens": MAX_SEQ_LEN - 8, "temperature": 1.0, "seed": 1,
            "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
    deadline = time.time() + 30
    while (after := _metrics(server))["qwen3moe_requests_running"] or \
            after.get(cancelled, 0) == before.get(cancelled, 0):
        assert time.time() < deadline, after
        time.sleep(0.05)
    decoded = after["qwen3moe_generated_tokens_total"] - before["qwen3moe_generated_tokens_total"]
    print(f"SSE-4: the client left after 3 chunks; the server decoded {decoded} of {MAX_SEQ_LEN - 8} tokens")
    assert after[cancelled] == before.get(cancelled, 0) + 1
    assert decoded < (MAX_SEQ_LEN - 8) // 2


def test_concurrent_streams_each_get_their_own_tokens(client, local):
    prompts = ["def fibonacci(n):", "The capital of France is", "混合专家", "1, 2, 3, 5, 8,"]
    alone = [local.complete(p, 24, stop_token_ids=local.config.eos_token_ids).text for p in prompts]
    results = [None] * 4

    def run(i):
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=24, temperature=0,
                                           stream=True)
        results[i] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


# Issue 20.7: every request parameter over HTTP gives the tokens of the same SamplingParams via Model.complete.
PROMPT = "def fibonacci(n):"
PARAMETER_CASES = {  # name: (request fields, the SamplingParams fields they mean)
    "temperature": ({"temperature": 0.7, "seed": 5}, dict(temperature=0.7, seed=5)),
    "top_k": ({"temperature": 1.0, "top_k": 5, "seed": 6}, dict(temperature=1.0, top_k=5, seed=6)),
    "top_p": ({"temperature": 1.0, "top_p": 0.5, "seed": 7}, dict(temperature=1.0, top_p=0.5, seed=7)),
    "seed": ({"temperature": 1.0, "seed": 123}, dict(temperature=1.0, seed=123)),
    "repetition_penalty": ({"temperature": 0, "repetition_penalty": 1.8}, dict(repeat_penalty=1.8)),
    "repeat_last_n": ({"temperature": 0, "repetition_penalty": 1.8, "repeat_last_n": 3},
                      dict(repeat_penalty=1.8, repeat_last_n=3)),
    "stop": ({"temperature": 0, "stop": ["STOP"]}, dict(stop=("STOP",))),  # STOP is set from the text below
    "logprobs": ({"temperature": 0, "logprobs": 3}, dict(logprobs=3)),
    "max_tokens": ({"temperature": 0, "max_tokens": 7}, dict(max_new_tokens=7)),
}


def _parameter_cases(local):
    """The cases, with the stop string cut from the middle of the greedy text so that it does stop it."""
    greedy = local.complete(PROMPT, 24, stop_token_ids=local.config.eos_token_ids).text
    stop = next(greedy[a:a + 2] for a in range(6, len(greedy) - 2) if greedy[a:a + 2] not in greedy[:a + 1])
    cases = dict(PARAMETER_CASES, stop=({"temperature": 0, "stop": [stop]}, dict(stop=(stop,))))
    return {name: (dict(fields), dict(settings)) for name, (fields, settings) in cases.items()}


def _expected(local, settings):
    sampling = qj.SamplingParams(**{"max_new_tokens": 24, **settings})
    result = local.complete(PROMPT, sampling=sampling, stop_token_ids=local.config.eos_token_ids)
    logprobs = [lp.logprob for lp in result.logprobs] if result.logprobs else None
    return result.text, len(result.token_ids), {"stop_string": "stop", "eos": "stop"}.get(
        result.finish_reason, "length"), logprobs


def _over_http(server, fields):
    reply = httpx.post(f"{server}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 24, **fields}).json()
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]["token_logprobs"] if choice["logprobs"] else None
    return choice["text"], reply["usage"]["completion_tokens"], choice["finish_reason"], logprobs


def test_every_request_parameter_over_http_gives_the_tokens_of_model_complete(server, local):
    """Each parameter alone (one request at a time), then all of them at once sharing decode steps: the text,
    token count, finish reason and logprobs of Model.complete with the same SamplingParams (the same weights,
    the same max_batch-row engine, so float32 results agree bit for bit)."""
    cases = _parameter_cases(local)
    expected = {name: _expected(local, settings) for name, (_, settings) in cases.items()}
    assert expected["stop"][2] == "stop" and expected["max_tokens"][1] == 7  # the cases do what they say
    assert expected["seed"] != expected["temperature"]
    for name, (fields, _) in cases.items():
        assert _over_http(server, fields) == expected[name], name
    together: dict[str, tuple] = {}
    threads = [threading.Thread(target=lambda n=name, f=fields: together.__setitem__(n, _over_http(server, f)))
               for name, (fields, _) in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == expected


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = [
    # (path, body (dict, or raw bytes), status, param)
    (CHAT, b'{"model": "tiny", "messages": [', 400, None),
    (CHAT, b"[1, 2, 3]", 400, None),
    (CHAT, b"not json at all", 400, None),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"content": "Hi"}]}, 400, "messages.0.role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 42}]}, 400, "messages.0.content"),
    (CHAT, {"model": "gpt-4o", "messages": HI}, 404, "model"),
    (CHAT, {"model": 7, "messages": HI}, 400, "model"),
    (CHAT, {"messages": HI}, 400, "model"),
    (CHAT, {"model": "tiny", "messages": HI, "temperature": -1}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": HI, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": HI, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": HI, "top_k": -3}, 400, "top_k"),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": HI, "max_completion_tokens": "ten"}, 400, "max_completion_tokens"),
    (CHAT, {"model": "tiny", "messages": HI, "seed": -1}, 400, "seed"),
    (CHAT, {"model": "tiny", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"model": "tiny", "messages": HI, "stop": [""]}, 400, None),
    (CHAT, {"model": "tiny", "messages": HI, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"model": "tiny", "messages": HI, "n": 2}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": HI, "stream": "yes"}, 400, "stream"),
    (CHAT, {"model": "tiny", "messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"model": "tiny", "messages": HI, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": MAX_SEQ_LEN}, 400, "messages"),
    (COMPLETIONS, {"model": "tiny"}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 999999]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": ["hi", "ho"], "stream": True}, 400, "stream"),
    (COMPLETIONS, {"model": "tiny", "prompt": [[1, 2], [3, 999999]]}, 400, "prompt.1"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x" * 400, "max_tokens": 0, "echo": True}, 400, "prompt"),
    (CHAT, {"model": "tiny", "messages": HI, "echo": True}, 400, "echo"),
]


SURROGATE = "\ud800"  # a lone UTF-16 surrogate: valid as a JSON escape, no character of any text
HOSTILE_REQUESTS = [
    # Lone surrogates in every kind of text, sent as the JSON escape a client's encoder writes for them.
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": f"a{SURROGATE}b"}]}, 400, "messages.0.content"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     400, "messages.0.content.0.text"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "Hi", "name": SURROGATE}]}, 400,
     "messages.0.name"),
    (CHAT, {"model": "tiny", "messages": HI, "stop": [SURROGATE]}, 400, "stop.0"),
    (CHAT, {"model": "tiny", "messages": HI, "chat_template_kwargs": {SURROGATE: True}}, 400,
     "chat_template_kwargs"),
    (CHAT, {"model": "tiny", "messages": HI, "tools": [{"type": "function", "function": {"name": SURROGATE}}]},
     400, "tools.0.function.name"),
    (CHAT, {"model": SURROGATE, "messages": HI}, 400, "model"),
    (COMPLETIONS, {"model": "tiny", "prompt": "\udfff"}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "stop": "\udc00x"}, 400, "stop"),
    # Numbers no engine array holds, or no JSON number is.
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": 10**30}, 400, "prompt"),
    (CHAT, {"model": "tiny", "messages": HI, "max_completion_tokens": 2**63}, 400, "messages"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "seed": 2**32}, 400, "seed"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "seed": 10**20}, 400, "seed"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, -1]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [2**31]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [10**30]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [[1, 2], []]}, 400, "prompt.1"),
    (COMPLETIONS, {"model": "tiny", "prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "repetition_penalty": 1e300}, 400, "repetition_penalty"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 2.0]}, 400, "prompt.1"),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, None),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', 400, None),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "hi", "repetition_penalty": -Infinity}', 400, None),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    # Text that is no text, nesting past any real request, bodies of the wrong shape.
    (COMPLETIONS, b'{"model": "tiny", "prompt": "caf\xe9"}', 400, None),
    (COMPLETIONS, b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', 400, None),
    (CHAT, {"model": "tiny", "messages": HI, "chat_template_kwargs": {"x": json.loads("[" * 80 + "]" * 80)}}, 400,
     None),
    (CHAT, b"[" * 100_000, 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"null", 400, None),
    (CHAT, b'"a string"', 400, None),
    (CHAT, b"42", 400, None),
    (CHAT, {"model": "tiny", "messages": HI, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content.0.text"),
    (CHAT, {"model": "tiny", "messages": HI, "stop": "x" * 1001}, 400, "stop"),
    # OpenAI's parameters that this server does not implement: refused when they ask for something.
    (CHAT, {"model": "tiny", "messages": HI, "presence_penalty": 0.5}, 400, "presence_penalty"),
    (CHAT, {"model": "tiny", "messages": HI, "frequency_penalty": -1}, 400, "frequency_penalty"),
    (CHAT, {"model": "tiny", "messages": HI, "logit_bias": {"5": 100}}, 400, "logit_bias"),
    (CHAT, {"model": "tiny", "messages": HI, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "suffix": "end"}, 400, "suffix"),
    (CHAT, {"model": "", "messages": HI}, 404, "model"),
    (CHAT, {"model": "x" * 100_000, "messages": HI}, 404, "model"),
]


def _send(client: httpx.Client, path: str, body, stream: bool = False, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(dict(body, stream=True) if stream else body).encode()
    elif stream:
        body = body.replace(b'"model"', b'"stream": true, "model"', 1)
    return client.post(path, content=body, headers=headers or {"content-type": "application/json"})


def _local_port(response: httpx.Response) -> int:
    """The client's port of the connection the response came on: the same port, the same connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_sse5_bad_requests_get_openai_errors_before_any_stream_and_the_connection_keeps_serving(server, client):
    ports = set()
    with httpx.Client(base_url=server, timeout=60) as http:
        for path, body, status, param in BAD_REQUESTS + HOSTILE_REQUESTS:
            # A streaming request is refused the same way, before the stream starts.
            for stream in (False, True) if not (isinstance(body, dict) and "stream" in body) else (False,):
                response = _send(http, path, body, stream)
                assert response.status_code == status, (body, stream, response.text)
                assert response.headers["content-type"] == "application/json", (body, stream)
                assert "close" not in response.headers.get("connection", "")
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
                assert error["param"] == param or param is None, (body, error)
                ports.add(_local_port(response))
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            response = http.post(COMPLETIONS, content=b'{"model": "tiny", "prompt": "hi"}',
                                 headers={"content-type": content_type} if content_type else {})
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_content_type"
            ports.add(_local_port(response))
        assert http.get(CHAT).status_code == 405
        assert http.post("/v1/nowhere", json={}).json()["error"]["message"]
        good = http.post(CHAT, json={"model": "tiny", "messages": HI, "max_tokens": 3, "temperature": 0})
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
        ports.add(_local_port(good))
    assert len(ports) == 1, f"{len(ports)} connections: a refused request closed its connection"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError, match="exceeds the KV cache length") as raised:
        client.completions.create(model="tiny", prompt="y" * 300)
    assert raised.value.code == "context_length_exceeded"


def test_openai_parameters_that_ask_for_nothing_are_accepted(server):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "max_tokens": 2}
    chat = httpx.post(f"{server}{CHAT}", json={"model": "tiny", "messages": HI, "response_format": {"type": "text"},
                                              "user": "u", "tool_choice": "auto"} | neutral)
    assert chat.status_code == 200, chat.text
    completion = httpx.post(f"{server}{COMPLETIONS}", json={"model": "tiny", "prompt": "hi", "echo": False,
                                                            "best_of": 1, "suffix": None} | neutral)
    assert completion.status_code == 200, completion.text


def test_integers_past_int32_that_mean_off_or_everything_run_as_their_exact_equivalent(server, local):
    """top_k >= the vocabulary keeps every token (as top_k off does); repeat_last_n >= the KV cache length
    covers the whole context (as that length does): the server maps them to the engine's int32 values."""
    base = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 1.5, "seed": 3,
            "repetition_penalty": 1.3}
    expected = local.complete("abc", 12, temperature=1.5, seed=3, repeat_penalty=1.3, repeat_last_n=MAX_SEQ_LEN,
                              top_k=0).text
    for extra in ({"top_k": 10**12, "repeat_last_n": 10**12}, {"top_k": local.config.vocab_size,
                                                                "repeat_last_n": 2**31}):
        whole = httpx.post(f"{server}{COMPLETIONS}", json=base | extra, timeout=60)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["text"] == expected
        with httpx.stream("POST", f"{server}{COMPLETIONS}", json=base | extra | {"stream": True}) as response:
            assert response.status_code == 200
            chunks = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                      if line.startswith("data: {")]
        assert not any("error" in chunk for chunk in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and the body of one HTTP response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_body_past_the_limit_gets_413_without_being_read(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # 5 MiB announced, 20 bytes sent: the answer comes without waiting for the rest.
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"model\": \"tiny\", " % (5 * 2**20))
        head, body = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 413"), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(4 * 2**20) in error["message"]

    def chunks():  # no Content-Length: the body arrives chunked, and is counted as it is read
        for _ in range(80):
            yield b" " * 2**16

    with httpx.Client(base_url=server, timeout=60) as http:
        response = http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        assert http.get("/health").status_code == 200
        assert _local_port(http.get("/health")) == _local_port(response)


def test_health_answers_within_100_ms_while_a_1_mb_prompt_is_prepared(server):
    big = [{"role": "user", "content": "hello world, " * 80_000}]  # 1 MB: a million tokens of this vocabulary
    outcome = {}

    def post_big():
        start = time.perf_counter()
        outcome["response"] = httpx.post(f"{server}{CHAT}", json={"model": "tiny", "messages": big}, timeout=120)
        outcome["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=post_big)
    thread.start()
    latencies = []
    with httpx.Client(base_url=server) as http:
        http.get("/health")  # connected before timing
        while thread.is_alive():
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    print(f"a 1 MB prompt took {outcome['seconds']:.2f} s to refuse; /health answered {len(latencies)} times "
          f"meanwhile, median {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
    assert outcome["response"].status_code == 400
    assert outcome["response"].json()["error"]["code"] == "context_length_exceeded"  # so it was tokenized
    assert outcome["seconds"] > 0.5 and len(latencies) >= 10  # the health checks overlapped the preparation
    # Tokenizing on the event loop (or in a thread of this process: the tokenizer holds the GIL) stalls every
    # check for seconds. The bound on the slowest leaves room for one scheduling hiccup of a loaded CI machine.
    assert sorted(latencies)[int(0.95 * len(latencies))] < 0.1 and max(latencies) < 0.5


def test_a_client_that_leaves_a_whole_response_cancels_it_at_the_next_token(server, local):
    """SSE-4 for a whole response: the request stops, is counted as cancelled, leaves no traceback in the server's
    log (the reply it would have been is never built), and the next request is served."""
    log_start = len(server.log())
    wanted = MAX_SEQ_LEN - 8
    alone = local.complete("a", wanted, temperature=1.0, seed=4, stop_token_ids=local.config.eos_token_ids)
    assert alone.finish_reason == "max_new_tokens"  # so only a cancel can end it early
    before = _metrics(server)
    cancelled, generated = "qwen3moe_requests_finished_total{reason=cancelled}", "qwen3moe_generated_tokens_total"
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": wanted, "temperature": 1.0, "seed": 4}).encode()
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 60
    while _metrics(server)[generated] == before[generated]:
        assert time.time() < deadline
        time.sleep(0.01)
    sock.close()  # the client goes away mid-generation
    while (after := _metrics(server))["qwen3moe_requests_running"] or \
            after.get(cancelled, 0) == before.get(cancelled, 0):
        assert time.time() < deadline, after
        time.sleep(0.05)
    time.sleep(0.3)
    assert _metrics(server)[generated] == after[generated]  # it stopped
    decoded = after[generated] - before[generated]
    print(f"the client left; the server decoded {decoded} of {wanted} tokens")
    assert after[cancelled] == before.get(cancelled, 0) + 1
    assert decoded < wanted
    next_reply = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5,
                                                               "temperature": 1.0, "seed": 4}, timeout=60)
    assert next_reply.status_code == 200
    assert next_reply.json()["choices"][0]["text"] == local.complete("a", 5, temperature=1.0, seed=4).text
    log = server.log()[log_start:]
    assert "Traceback" not in log and "Error" not in log, log


def test_an_unexpected_error_answers_500_with_an_error_object_and_the_app_keeps_serving(local, monkeypatch):
    from starlette.testclient import TestClient

    from qwen3moe_jax.serve import app as server_module

    def broken(*args):
        raise RuntimeError("a bug")

    with TestClient(server_module.create_app(local, "tiny")) as http:
        request = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        with monkeypatch.context() as patch:
            patch.setattr(server_module, "prepare_completion", broken)
            response = http.post(COMPLETIONS, json=request)
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal error: RuntimeError: a bug", "type": "server_error",
                                            "param": None, "code": None}
        assert http.post(COMPLETIONS, json=request).status_code == 200


def test_serving_beyond_loopback_without_a_key_warns(local, monkeypatch, capsys):
    import uvicorn

    from qwen3moe_jax.serve.app import serve
    from qwen3moe_jax.serve.http import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.20", "example.org"]))
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    for host, api_key, warned in [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)]:
        serve(local, "tiny", host, 8000, warmup_tokens=1, api_key=api_key)
        assert ("without an API key" in capsys.readouterr().err) == warned, (host, api_key)


def test_latency_script_measures_a_running_server(server):
    out = subprocess.run([sys.executable, "scripts/sse_latency.py", "--url", server, "--requests", "2",
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "time to first token: median" in out and "model tiny" in out


def test_a_full_queue_gets_503_with_retry_after_and_metrics_count_what_ran():
    """max_batch 1 and max_queue 0: while one request holds the only row, the next gets 503 with OpenAI's error
    object and Retry-After; /metrics (Prometheus text, the issue's names) counts the requests, tokens and
    latencies that ran."""
    from fastapi.testclient import TestClient

    from qwen3moe_jax.serve.app import create_app

    model = qj.random_model("tiny", std=0.2, max_seq_len=64, max_batch=1)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 40, "temperature": 0}
    with TestClient(create_app(model, "tiny", max_queue=0)) as client:
        first = client.post(COMPLETIONS, json=dict(body, max_tokens=3)).json()
        holder_started, release = threading.Event(), threading.Event()

        def hold_the_row():
            with client.stream("POST", COMPLETIONS, json=dict(body, stream=True)) as response:
                lines = response.iter_lines()
                next(line for line in lines if line)
                holder_started.set()
                release.wait(60)

        holder = threading.Thread(target=hold_the_row)
        holder.start()
        assert holder_started.wait(60) and model.scheduler.running == 1
        busy = client.post(COMPLETIONS, json=body)
        release.set()
        holder.join(60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        error = busy.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy" and "max_queue 0" in error["message"]
        deadline = time.time() + 60
        while model.scheduler.running:
            assert time.time() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name + "".join(f"{{{k}={v}}}" for k, v in s.labels.items()): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["qwen3moe_requests_running"] == 0 and samples["qwen3moe_requests_waiting"] == 0
    assert samples["qwen3moe_prompt_tokens_total"] == 2 * first["usage"]["prompt_tokens"]
    assert samples["qwen3moe_generated_tokens_total"] >= first["usage"]["completion_tokens"] + 1
    assert samples["qwen3moe_time_to_first_token_seconds_count"] == 2  # the 503 never started
    assert samples["qwen3moe_inter_token_latency_seconds_count"] == samples["qwen3moe_generated_tokens_total"] - 2
    # (TestClient does not pass a client's leaving on to the app, so the holder ran to its end: the
    # disconnect that frees a row is SSE-4's, against a real server.)
    assert sum(v for k, v in samples.items() if k.startswith("qwen3moe_requests_finished_total")) == 2


def test_long_texts_are_tokenized_in_a_child_process_exactly_as_in_this_one(bpe_tokenizer):
    from qwen3moe_jax.serve.tokenizer_process import SHORT_TEXT_CHARS, TokenizerProcess
    from tests.conftest import MIXED_TEXT

    encoder = TokenizerProcess(bpe_tokenizer)
    long_text = MIXED_TEXT * (3 * SHORT_TEXT_CHARS // len(MIXED_TEXT))
    for text in (long_text, long_text[7:] + "<|im_end|>", MIXED_TEXT):
        assert encoder.encode(text) == bpe_tokenizer.encode(text)
    assert encoder.child is not None  # the long ones went there
    encoder.child.kill()
    encoder.child.wait()
    assert encoder.encode(long_text) == bpe_tokenizer.encode(long_text)  # a dead child is replaced
