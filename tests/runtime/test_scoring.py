"""Scoring (runtime/evaluation.py, runtime/scoring.py): log-likelihoods of continuations equal transformers' on the
same random checkpoint in float32, whichever chunks they fall in and whether a shared context was computed once or
for each pair; prompt logprobs and max_new_tokens=0; the errors of bad requests."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.runtime.evaluation import perplexity_windows
from qwen3moe_jax.tools.parity import hf_logits
from tests.hf_reference import save_hf_model

SHAPE = dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_hidden_layers=2,
             num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, vocab_size=300)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(our model of a random checkpoint: 3 rows of 96 tokens, prefill chunks of 16; transformers' of it)."""
    path = tmp_path_factory.mktemp("scoring")
    hf = save_hf_model(path, seed=3, **SHAPE)
    return qj.load(path, max_seq_len=96, max_batch=3, prefill_chunk=16, progress=False), hf


def test_scores_equal_transformers_across_chunks_and_with_a_shared_context(checkpoint):
    """Pairs of a 37-token context (chunks of 16: the context's last token sits in the third chunk) and
    continuations of 1 to 20 tokens, one crossing into a fifth chunk; scored together on 3 rows, the context's two
    whole chunks computed once and copied. Each total, each token's logprob and the greedy flag equal transformers'
    single pass (relative error of the totals <= 1e-5), and the same bits come out with the prefix cache off."""
    model, hf = checkpoint
    rng = np.random.default_rng(0)
    context = rng.integers(0, 300, 37).tolist()
    continuations = [rng.integers(0, 300, n).tolist() for n in (1, 5, 20, 11)]
    greedy = [int(hf_logits(hf, context)[-1].argmax())]
    continuations.append(greedy)  # a greedy one, which the flag must say is greedy
    pairs = [(context, c) for c in continuations] + [(rng.integers(0, 300, 9).tolist(), [7, 8])]

    before = model.scheduler.cached_tokens
    scores = model.score_batch(pairs)
    assert model.scheduler.cached_tokens - before == 32 * (len(continuations) - 1)  # followers copied 2 chunks
    errors = []
    for (ctx, cont), score in zip(pairs, scores, strict=True):
        ids = ctx + cont
        reference = log_softmax(hf_logits(hf, ids))
        token_logprobs = [reference[p - 1, ids[p]] for p in range(len(ctx), len(ids))]
        np.testing.assert_allclose(score.token_logprobs, token_logprobs, rtol=1e-5, atol=1e-6)
        errors.append(abs(score.logprob - sum(token_logprobs)) / abs(sum(token_logprobs)))
        assert score.tokens == cont
        assert score.greedy == all(reference[p - 1].argmax() == ids[p] for p in range(len(ctx), len(ids)))
    print(f"scores vs transformers: max relative error of the totals {max(errors):.2e}")
    assert max(errors) <= 1e-5
    assert scores[len(continuations) - 1].greedy

    model.scheduler.prefix_cache.enabled = False
    try:
        assert model.score_batch(pairs) == scores  # bit for bit: reused chunks are the chunks a cold run computes
    finally:
        model.scheduler.prefix_cache.enabled = True
    assert model.score(*pairs[2]) == scores[2]


def test_prompt_logprobs_without_new_tokens(checkpoint):
    """max_new_tokens=0 generates nothing and may fill the whole cache; prompt_logprobs gives every prompt token's
    logprob (None for the first) and the most likely alternatives, as transformers computes them."""
    model, hf = checkpoint
    ids = np.random.default_rng(1).integers(0, 300, 96).tolist()
    done = model.complete(ids, max_new_tokens=0, prompt_logprobs=3)
    assert done.token_ids == [] and done.text == "" and done.finish_reason == "max_new_tokens"
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens == 96
    reference = log_softmax(hf_logits(hf, ids))
    assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == 96
    for p, entry in enumerate(done.prompt_logprobs[1:], start=1):
        assert entry.logprob == pytest.approx(reference[p - 1, ids[p]], rel=1e-5, abs=1e-6)
        assert [t for t, _ in entry.top] == np.argsort(-reference[p - 1])[:3].tolist()
    events = list(model.stream(ids[:5], max_new_tokens=0))
    assert len(events) == 1 and events[0].token_id is None and events[0].usage.completion_tokens == 0
    assert model.complete(ids[:5], max_new_tokens=2).prompt_logprobs is None  # not asked for


def test_perplexity_windows_and_bad_requests(checkpoint):
    model, _ = checkpoint
    # llama.cpp's windows: 100 // 32 consecutive windows scored after their middle; with stride 8,
    # ceil((100 - 32) / 8) windows every 8 tokens, each scoring its last 8.
    assert perplexity_windows(100, 32) == [(0, 17), (32, 17), (64, 17)]
    assert perplexity_windows(100, 32, 8) == [(8 * i, 24) for i in range(9)]
    with pytest.raises(qj.ContextLengthError, match="too short"):
        perplexity_windows(31, 32)
    with pytest.raises(qj.Qwen3MoeError, match="stride"):
        perplexity_windows(100, 32, 32)
    with pytest.raises(qj.ContextLengthError, match="KV cache length 96"):
        model.perplexity(list(range(200)), context=128)
    with pytest.raises(qj.Qwen3MoeError, match="continuation of at least one token"):
        model.score([1, 2], [])
    with pytest.raises(qj.Qwen3MoeError, match="continuation of at least one token"):
        model.score([], [1, 2])
    with pytest.raises(qj.ContextLengthError):
        model.score(list(range(95)), [1, 2, 3])
    with pytest.raises(qj.SamplingError, match="at most 20"):
        model.complete([1, 2, 3], max_new_tokens=0, prompt_logprobs=21)
    with pytest.raises(qj.SamplingError, match="prompt_logprobs"):
        qj.SamplingParams(prompt_logprobs=-1)
