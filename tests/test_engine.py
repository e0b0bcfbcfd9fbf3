"""KV cache and jit engine: KV-1 (cached == uncached), KV-2 (compile once, donated buffer), KV-3."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.engine import bucket_length, decode_step, prefill_step
from qwen3moe_jax.sampling import SamplerState


@pytest.fixture(scope="module")
def model(hf_tiny):
    return qj.load(hf_tiny[0], max_seq_len=64, progress=False)


def _greedy_state(rows, max_len):
    return SamplerState.from_params([qj.SamplingParams()] * rows), jnp.zeros((rows, max_len), jnp.int32)


def _prefill(model, prompts, cache):
    """The step's logits and cache (its sampled token and history are the engine's business)."""
    lengths = [len(p) for p in prompts]
    padded = np.zeros((len(prompts), bucket_length(max(lengths), cache.max_len)), np.int32)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
    sampler, history = _greedy_state(len(prompts), cache.max_len)
    _, logits, cache, _ = prefill_step(model.params, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32), cache,
                                       history, sampler, model.config)
    return logits, cache


def _decode(model, tokens, positions, cache):
    sampler, history = _greedy_state(len(tokens), cache.max_len)
    _, logits, cache, _ = decode_step(model.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                                      cache, history, sampler, model.config)
    return logits, cache


@pytest.mark.parametrize("n,m", [(1, 6), (15, 4), (16, 4), (17, 8), (31, 5), (33, 3)])
def test_kv1_prefill_then_decode_equals_full_forward(model, n, m):
    """KV-1: prefill N tokens + M decode steps gives the logits of one full pass over N+M tokens."""
    seq = np.random.default_rng(n).integers(0, model.config.vocab_size, n + m).tolist()
    full = model.logits(seq)
    cache = qj.KVCache.init(model.config, 1, model.max_seq_len)
    logits, cache = _prefill(model, [seq[:n]], cache)
    stepwise = [np.asarray(logits[0])]
    for j in range(m - 1):
        logits, cache = _decode(model, [seq[n + j]], [n + j], cache)
        stepwise.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(stepwise), full[n - 1 : n + m - 1], atol=1e-5, rtol=1e-5)


def test_kv1_greedy_with_cache_equals_greedy_by_full_forward(model):
    prompt = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 15 tokens: decode crosses bucket 16
    cached = model.generate(prompt, max_new_tokens=12, stop_token_ids=[])
    uncached = []
    for _ in range(12):
        uncached.append(int(np.argmax(model.logits(prompt + uncached)[-1])))
    assert cached == uncached


def test_batch_rows_at_different_positions_match_single_row_runs(model):
    """The functions take batch > 1: rows of different lengths prefill and decode at their own positions."""
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, model.config.vocab_size, 9).tolist(), rng.integers(0, 300, 16).tolist()]
    prompts = [seqs[0][:5], seqs[1][:12]]
    cache = qj.KVCache.init(model.config, 2, model.max_seq_len)
    logits, cache = _prefill(model, prompts, cache)
    rows = [[np.asarray(logits[r])] for r in range(2)]
    for j in range(4):
        tokens = [seqs[0][5 + j], seqs[1][12 + j]]
        logits, cache = _decode(model, tokens, [5 + j, 12 + j], cache)
        for r in range(2):
            rows[r].append(np.asarray(logits[r]))
    for r, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        n = len(prompt)
        np.testing.assert_allclose(np.stack(rows[r]), model.logits(seq)[n - 1 : n + 4], atol=1e-5, rtol=1e-5)


def test_kv2_compiles_once_per_bucket_and_decode_once(hf_tiny):
    """KV-2: prefill compiles once per length bucket; decode once for all positions of one attention window
    (a cache of at most MIN_WINDOW slots is one window)."""
    # A cache length no other test uses, so every compile counted here is this test's own.
    model = qj.load(hf_tiny[0], max_seq_len=72, progress=False)
    prefill_before, decode_before = prefill_step._cache_size(), decode_step._cache_size()
    for n in (3, 9, 16):  # bucket 16
        model.generate(list(range(1, n + 1)), max_new_tokens=2, stop_token_ids=[])
    assert prefill_step._cache_size() - prefill_before == 1
    for n in (17, 30, 32):  # bucket 32
        model.generate(list(range(1, n + 1)), max_new_tokens=20, stop_token_ids=[])
    assert prefill_step._cache_size() - prefill_before == 2
    # Every request above decoded at new positions (up to 51): still one decode compilation.
    assert decode_step._cache_size() - decode_before == 1
    print(f"KV-2 compiles: prefill {prefill_step._cache_size() - prefill_before} (2 buckets), "
          f"decode {decode_step._cache_size() - decode_before}")


def test_decode_reads_only_its_window_of_a_long_cache_and_warmup_compiles_every_window(hf_tiny):
    """A cache longer than MIN_WINDOW: decode attends over a window of it, and greedy decoding that crosses
    from window 256 into 512 still equals greedy decoding by full forward passes."""
    from qwen3moe_jax.engine import MIN_WINDOW, attention_window

    model = qj.load(hf_tiny[0], max_seq_len=600, progress=False)  # a cache length only this test uses
    assert [attention_window(n, 600) for n in (1, 256, 257, 512, 513)] == [MIN_WINDOW, 256, 512, 512, 600]
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, 250).tolist()
    before = decode_step._cache_size()
    model.engine.warmup(len(prompt), 12)
    assert decode_step._cache_size() - before == 2  # windows 256 and 512
    cached = model.generate(prompt, max_new_tokens=12, stop_token_ids=[])
    assert decode_step._cache_size() - before == 2  # warm-up compiled every window the request reached
    uncached = []
    for _ in range(12):
        uncached.append(int(np.argmax(model.logits(prompt + uncached)[-1])))
    assert cached == uncached


def test_kv2_decode_updates_the_donated_cache_in_place(model):
    cache = qj.KVCache.init(model.config, 1, model.max_seq_len)
    logits, cache = _prefill(model, [[1, 2, 3]], cache)
    pointers = [a.unsafe_buffer_pointer() for a in cache.k + cache.v]
    old = cache
    for j in range(3):
        logits, cache = _decode(model, [4 + j], [3 + j], cache)
    assert all(a.is_deleted() for a in old.k + old.v), "the cache was not donated"
    assert [a.unsafe_buffer_pointer() for a in cache.k + cache.v] == pointers, "decode reallocated the cache"


def test_kv3_request_longer_than_cache_fails_before_any_work(model):
    before = prefill_step._cache_size()
    with pytest.raises(qj.ContextLengthError, match="exceeds the KV cache length 64"):
        model.generate(list(range(1, 61)), max_new_tokens=5)
    with pytest.raises(qj.ContextLengthError):
        model.stream(list(range(1, 65)), 1)  # raises on the call, before any iteration
    with pytest.raises(qj.ContextLengthError):  # filling the cache needs room for one token
        model.stream(list(range(1, 65)), sampling=qj.SamplingParams(max_new_tokens=None))
    assert prefill_step._cache_size() == before
    # The model still serves a request that fits.
    assert len(model.generate([1, 2, 3], max_new_tokens=4, stop_token_ids=[])) == 4


def test_generation_stops_at_a_stop_token_and_includes_it(model):
    free = model.generate([1, 2, 3], max_new_tokens=8, stop_token_ids=[])
    stopped = model.generate([1, 2, 3], max_new_tokens=8, stop_token_ids=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]


def test_bad_requests_raise_specific_errors(model):
    with pytest.raises(qj.Qwen3MoeError, match="empty"):
        model.generate([], max_new_tokens=4)
    with pytest.raises(qj.Qwen3MoeError, match="outside the vocabulary"):
        model.generate([1, 300], max_new_tokens=4)
    with pytest.raises(qj.Qwen3MoeError, match="max_new_tokens"):
        model.generate([1, 2], max_new_tokens=0)
    with pytest.raises(qj.Qwen3MoeError, match="no tokenizer"):
        model.generate("text", max_new_tokens=4)
