"""`serve --speculative ngram` end to end over HTTP: the bundled model's tokens, greedy and seeded, streamed and
whole, are those of plain decoding, and /metrics counts the drafted and accepted tokens (a draft model's server,
`--draft-model`, runs the same code past building the model: tests/runtime/test_draft_model.py)."""

from __future__ import annotations

import json

import httpx
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.api import BUNDLED_MODEL
from tests.runtime.test_speculative import REPEATING
from tests.server_process import running_server

MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def local():
    return qj.load(progress=False, max_seq_len=MAX_SEQ_LEN)


def test_a_speculative_server_answers_with_the_tokens_of_plain_decoding(local):
    greedy = local.complete(REPEATING, 40, stop_token_ids=local.config.eos_token_ids)
    seeded = local.complete("def add(a, b):", 24, stop_token_ids=local.config.eos_token_ids, temperature=0.8,
                            seed=7)
    with running_server("--max-seq-len", str(MAX_SEQ_LEN), "--warmup-tokens", "16", "--max-batch", "2",
                        "--decode-steps", "1", "--draft-tokens", "3", "--speculative", "ngram",
                        preset=None) as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": model, "prompt": REPEATING, "max_tokens": 40, "temperature": 0}).json()
        assert reply["choices"][0]["text"] == greedy.text
        assert reply["usage"]["completion_tokens"] == len(greedy.token_ids)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
                "model": model, "prompt": "def add(a, b):", "max_tokens": 24, "temperature": 0.8, "seed": 7,
                "stream": True}) as r:
            events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == seeded.text
        metrics = httpx.get(f"{url}/metrics").text
    accepted = next(line for line in metrics.splitlines() if line.startswith("qwen3moe_speculative_accepted_tokens"))
    assert float(accepted.split()[-1]) > 10


def test_a_draft_model_server_compiles_its_programs_before_serving_and_answers_with_plain_tokens(local):
    """`serve --draft-model` (the bundled model drafting for itself): the draft model's programs compile in the
    warm-up, nothing compiles once it serves, and a greedy reply is plain decoding's, its drafts kept."""
    greedy = local.complete(REPEATING, 24, stop_token_ids=local.config.eos_token_ids)
    with running_server("--max-seq-len", str(MAX_SEQ_LEN), "--warmup-tokens", "64", "--max-batch", "1",
                        "--decode-steps", "1", "--draft-tokens", "3", "--draft-model", str(BUNDLED_MODEL),
                        preset=None, env={"JAX_LOG_COMPILES": "1"}) as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": model, "prompt": REPEATING, "max_tokens": 24, "temperature": 0}).json()
        metrics = httpx.get(f"{url}/metrics").text
        log = url.log()
    assert reply["choices"][0]["text"] == greedy.text
    accepted = next(line for line in metrics.splitlines() if line.startswith("qwen3moe_speculative_accepted_tokens"))
    assert float(accepted.split()[-1]) > 10
    warmup, serving = log.split("[compiled in")
    assert "draft model: draft 3 after 8 fed" in warmup and "Compiling" in warmup
    assert "Compiling" not in serving, serving
