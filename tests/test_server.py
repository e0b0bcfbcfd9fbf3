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

MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3moe_jax.cli", "serve", "--preset", "tiny", "--port", str(port),
         "--max-seq-len", str(MAX_SEQ_LEN), "--warmup-tokens", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health").json()["status"] == "ready":
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


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
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
]


def test_sse5_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    for path, body, status, param in BAD_REQUESTS:
        if isinstance(body, bytes):
            response = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"})
        else:
            response = httpx.post(f"{server}{path}", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
        assert error["param"] == param or param is None, (body, error)
    assert httpx.get(f"{server}{CHAT}").status_code == 405
    assert httpx.post(f"{server}/v1/nowhere", json={}).json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError, match="exceeds the KV cache length") as raised:
        client.completions.create(model="tiny", prompt="y" * 300)
    assert raised.value.code == "context_length_exceeded"
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_latency_script_measures_a_running_server(server):
    out = subprocess.run([sys.executable, "scripts/sse_latency.py", "--url", server, "--requests", "2",
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "time to first token: median" in out and "model tiny" in out


def test_a_full_queue_gets_503_with_retry_after_and_metrics_count_what_ran():
    """max_batch 1 and max_queue 0: while one request holds the only row, the next gets 503 with OpenAI's error
    object and Retry-After; /metrics (Prometheus text, the issue's names) counts the requests, tokens and
    latencies that ran."""
    from fastapi.testclient import TestClient

    from qwen3moe_jax.server import create_app

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
