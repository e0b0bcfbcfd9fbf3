"""Prefix caching through the server (issue 33): `usage.prompt_tokens_details.cached_tokens` in chat and completions
replies, whole and in a stream's usage chunk; the Prometheus counters of prompt tokens computed and reused; and the
replies of a server started with `--no-prefix-cache` (which reports 0) equal, token for token and logprob for
logprob, those of one with the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from qwen3moe_jax.serve.app import create_app
from qwen3moe_jax.tools.cli import build_model, build_parser

# The tiny preset's tokenizer takes a byte a token; the server's prefill chunk is 128 (the default).
PREFIX = "".join(np.random.default_rng(33).choice(list("abcdefgh ()=:"), 150))
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
# (route, body, whether a later request reuses the shared prefix: 128 of its tokens, one chunk)
REQUESTS = [
    ("/v1/completions", {"prompt": PREFIX + " one", "temperature": 0, "logprobs": 2}, False),
    ("/v1/completions", {"prompt": PREFIX + " two", "temperature": 0.8, "seed": 4, "logprobs": 2, "stream": True,
                         "stream_options": {"include_usage": True}}, True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PREFIX + " three"}], "temperature": 0,
                              "logprobs": True, "top_logprobs": 2, **NO_THINKING}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PREFIX + " four"}], "temperature": 0.8,
                              "seed": 5, "logprobs": True, "top_logprobs": 2, "stream": True,
                              "stream_options": {"include_usage": True}, "repetition_penalty": 1.5, **NO_THINKING},
     True),
]


def _serve(*flags: str):
    """The app `qwen3moe-jax serve --preset tiny FLAGS` serves (in this process)."""
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--max-seq-len", "256", "--no-compile-cache",
                                      *flags])
    return TestClient(create_app(build_model(args), "tiny"))


def _reply(http: TestClient, route: str, body: dict) -> tuple[dict, dict]:
    """(what the reply says: text, finish reason, logprobs; its usage), for a whole reply or a stream."""
    body = {"model": "tiny", "max_tokens": 10, **body}
    if not body.get("stream"):
        reply = http.post(route, json=body).json()
        choice = reply["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return {"text": text, "finish": choice["finish_reason"], "logprobs": choice["logprobs"]}, reply["usage"]
    with http.stream("POST", route, json=body) as response:
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c for e in events for c in e["choices"]]
    text = "".join(c["delta"].get("content") or "" if "delta" in c else c["text"] for c in choices)
    finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
    assert events[-1]["choices"] == []  # the usage chunk
    return {"text": text, "finish": finish, "logprobs": [c["logprobs"] for c in choices]}, events[-1]["usage"]


def _metrics(http: TestClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for family in text_string_to_metric_families(http.get("/metrics").text)
            for s in family.samples if s.name.startswith("qwen3moe_prompt_tokens")}


@pytest.fixture(scope="module")
def replies():
    """Each server's replies to REQUESTS, in order, and its prompt-token counters after them."""
    out = {}
    for name, flags in (("cached", ()), ("uncached", ("--no-prefix-cache",))):
        with _serve(*flags) as http:
            out[name] = [_reply(http, route, body) for route, body, _ in REQUESTS], _metrics(http)
    return out


def test_cached_tokens_are_reported_in_whole_and_streamed_chat_and_completions_usage(replies):
    for (_, usage), (route, body, reuses) in zip(replies["cached"][0], REQUESTS, strict=True):
        assert usage["prompt_tokens_details"] == {"cached_tokens": 128 if reuses else 0}, (route, body)
        assert usage["prompt_tokens"] > 128 and usage["total_tokens"] == usage["prompt_tokens"] + \
            usage["completion_tokens"]
    for _, usage in replies["uncached"][0]:
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_no_prefix_cache_gives_the_same_tokens_and_logprobs(replies):
    for (cached, cached_usage), (uncached, uncached_usage) in zip(replies["cached"][0], replies["uncached"][0],
                                                                  strict=True):
        assert cached == uncached
        assert cached_usage["completion_tokens"] == uncached_usage["completion_tokens"]


def test_the_metrics_count_prompt_tokens_computed_and_reused(replies):
    for name, reused in (("cached", 256), ("uncached", 0)):
        usages, metrics = replies[name]
        total = sum(usage["prompt_tokens"] for _, usage in usages)
        assert metrics["qwen3moe_prompt_tokens_total"] == total
        assert metrics["qwen3moe_prompt_tokens_cached_total"] == reused
        assert metrics["qwen3moe_prompt_tokens_computed_total"] == total - reused
