"""Prompt logprobs over HTTP: /v1/completions with echo and logprobs answers as OpenAI's legacy completions API did
(the prompt's tokens, null for the first token's logprob, top_logprobs, text_offset, then the completion's), for one
prompt or a list, with max_tokens 0 or more, whole or streamed; vLLM's tokenizer routes; refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

import qwen3moe_jax as qj
from qwen3moe_jax.serve.app import create_app
from tests.runtime.test_scoring import log_softmax

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def served():
    model = qj.random_model("tiny", std=0.2, max_seq_len=64, max_batch=4, prefill_chunk=16)  # one chunk shape
    with TestClient(create_app(model, "tiny", api_key="key")) as http:
        http.headers["Authorization"] = "Bearer key"
        yield model, http


def test_echo_returns_the_prompts_logprobs_then_the_completions(served):
    model, http = served
    ids = model.encode(PROMPT)
    reference = log_softmax(model.logits(ids))  # one full pass, no cache: independent of the scoring chunks
    reply = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 2,
                                               "max_tokens": 3, "temperature": 0}).json()
    choice = reply["choices"][0]
    completion = model.complete(ids, max_new_tokens=3, logprobs=2)
    assert choice["text"] == PROMPT + completion.text
    logprobs = choice["logprobs"]
    n = len(ids)
    assert len(logprobs["tokens"]) == n + 3 and logprobs["tokens"][:n] == [model.tokenizer.decode([t]) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    np.testing.assert_allclose(logprobs["token_logprobs"][1:n], [reference[p - 1, ids[p]] for p in range(1, n)],
                               rtol=1e-5, atol=1e-5)
    assert logprobs["token_logprobs"][n:] == [lp.logprob for lp in completion.logprobs]
    # Keyed by text, as OpenAI's were: two tokens of one text (bytes that are no character) share a key.
    for logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True):
        assert 1 <= len(top) <= 2 and max(top.values()) >= logprob
    # Each prompt token's text starts at its offset in the choice's text; the completion's tokens (random bytes of a
    # random model, maybe parts of characters) start past the prompt.
    text, offsets = choice["text"], logprobs["text_offset"]
    assert all(text[o: o + len(t)] == t for o, t in zip(offsets[:n], logprobs["tokens"], strict=False))
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[n] == len(PROMPT)
    assert reply["usage"]["prompt_tokens"] == n and reply["usage"]["completion_tokens"] == 3


def test_a_list_of_prompts_with_max_tokens_0_and_a_stream(served):
    model, http = served
    ids = model.encode(PROMPT)
    body = {"model": "tiny", "prompt": [ids, ids[:7], ids[:1]], "echo": True, "logprobs": 1, "max_tokens": 0}
    reply = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["text"] for c in reply["choices"]] == [PROMPT, PROMPT[:7], PROMPT[:1]]
    assert [c["finish_reason"] for c in reply["choices"]] == ["length"] * 3
    whole, short, single = (c["logprobs"]["token_logprobs"] for c in reply["choices"])
    assert single == [None] and short[0] is None  # a prefix's logprobs are the whole's (chunk shapes differ)
    np.testing.assert_allclose(short[1:], whole[1:7], rtol=1e-5)
    assert reply["usage"]["prompt_tokens"] == len(ids) + 8 and reply["usage"]["completion_tokens"] == 0

    with http.stream("POST", "/v1/completions", json=dict(body, prompt=ids, stream=True)) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == PROMPT
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == whole
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert http.post("/v1/completions", json=dict(body, prompt=PROMPT, echo=False)).json()["choices"][0]["text"] == ""


def test_tokenizer_routes_and_refusals(served):
    model, http = served
    tokens = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert tokens == model.encode(PROMPT)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": PROMPT}
    assert http.get("/tokenizer_info").json()["eos_token"] == model.tokenizer.eos_token
    assert http.get("/tokenizer_info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused = [({"model": "tiny", "prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
               ({"model": "tiny", "prompt": "x" * 80, "echo": True, "max_tokens": 0}, "prompt"),
               ({"model": "tiny", "prompt": ["hi", ""]}, "prompt.1")]
    for body, param in refused:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    chat = http.post("/v1/chat/completions", json={"model": "tiny", "echo": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported_parameter"
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
