"""The engine's steps: chunked prefill and decode blocks against transformers (KV-1), compiles (KV-2), requests
the cache cannot hold (KV-3), rows that a step must leave untouched, and decode_steps end to end."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.model.transformer import attention_window
from qwen3moe_jax.runtime.engine import Engine
from qwen3moe_jax.tools.bench import CompileLog
from qwen3moe_jax.tools.parity import hf_greedy, hf_logits

CHUNK = 16


@pytest.fixture(scope="module")
def model(hf_tiny):
    return qj.load(hf_tiny[0], max_seq_len=64, progress=False, prefill_chunk=CHUNK, decode_steps=3)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _check_logprobs(step_logprobs, reference_logits: np.ndarray) -> None:
    """Each step's chosen and top-LOGPROBS_MAX logprobs equal transformers' log-softmax at those ids (f32)."""
    for lp, logits in zip(step_logprobs, reference_logits, strict=True):
        ref = _log_softmax(logits.astype(np.float64))
        ids, values = zip(*lp.top, strict=True)
        np.testing.assert_allclose(values, ref[list(ids)], atol=3e-5, rtol=1e-5)
        assert list(ids) == list(np.argsort(-ref, kind="stable")[: len(ids)])


@pytest.mark.parametrize("n", [5, 16, 17, 37, 48])
def test_kv1_chunked_prefill_and_decode_blocks_match_transformers(model, hf_tiny, n):
    """A prompt of up to three chunks of 16 (and one ending exactly on a chunk boundary), prefilled chunk by
    chunk, then decode blocks of 3: every step's logprobs and the greedy tokens equal transformers' single
    forward pass over the same tokens."""
    prompt = np.random.default_rng(n).integers(0, model.config.vocab_size, n).tolist()
    result = model.complete(prompt, 10, logprobs=20, stop_token_ids=[])
    assert result.token_ids == hf_greedy(hf_tiny[1], prompt, 10)
    reference = hf_logits(hf_tiny[1], prompt + result.token_ids[:-1])[n - 1:]
    _check_logprobs(result.logprobs, reference)


def test_whole_batch_prefill_equals_one_row_at_a_time(model):
    """Engine.prefill with row=None (every row at once, as a benchmark's batch prefill) samples what the
    one-row chunks sample, and decode then continues every row alike."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 300, 40).tolist()
    engine = Engine(model.params, model.config, 64, batch_size=3, prefill_chunk=CHUNK, decode_steps=2)
    engine.set_sampling([None] * 3)
    for start in range(0, 40, CHUNK):
        out = engine.prefill(None, [prompt[start:start + CHUNK]] * 3, [start] * 3, [40] * 3)
    first = np.asarray(out.token)[0]
    tokens = np.asarray(engine.decode([40] * 3, [True] * 3).token)
    alone = model.generate(prompt, 3, stop_token_ids=[])
    assert first.tolist() == [alone[0]] * 3
    assert tokens.T.tolist() == [alone[1:3]] * 3


def test_rows_a_step_does_not_run_are_left_exactly_as_they_were(model):
    """A decode block leaves a free row and a row part-way through its prompt untouched (cache and history,
    bit for bit), and a chunk prefilled into one row leaves the others untouched; the paused prompt then
    finishes and generates what it generates alone."""
    rng = np.random.default_rng(2)
    paused, running = rng.integers(0, 300, 40).tolist(), rng.integers(0, 300, 20).tolist()
    engine = Engine(model.params, model.config, 64, batch_size=3, prefill_chunk=CHUNK, decode_steps=3)
    engine.set_sampling([None] * 3)
    engine.prefill(0, paused[:CHUNK], 0, 40)  # row 0: one chunk of three
    engine.prefill(2, running[:CHUNK], 0, 20)
    before = jax.device_get((engine._state().cache, engine._state().history))
    engine.prefill(2, running[CHUNK:], CHUNK, 20)
    for step in range(3):  # row 2 decodes past the positions row 0's next chunks will fill
        engine.decode([0, 0, 20 + 3 * step], [False, False, True])
    after = jax.device_get((engine._state().cache, engine._state().history))
    for row in (0, 1):
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(a[row], b[row])
    engine.prefill(0, paused[CHUNK:2 * CHUNK], CHUNK, 40)
    out = engine.prefill(0, paused[2 * CHUNK:], 2 * CHUNK, 40)
    tokens = [int(np.asarray(out.token)[0, 0])]
    tokens += np.asarray(engine.decode([40, 0, 0], [True, False, False]).token)[:, 0].tolist()
    assert tokens == model.generate(paused, 4, stop_token_ids=[])


def test_kv2_warmup_compiles_every_shape_a_request_uses_and_nothing_compiles_after(hf_tiny):
    """Prefill compiles one shape per first-chunk bucket (16 for short prompts) and one per later chunk's
    attention window; decode once per window. After warm-up, requests of any length compile nothing."""
    model = qj.load(hf_tiny[0], max_seq_len=600, progress=False, prefill_chunk=64, decode_steps=2)
    engine = model.engine
    assert [attention_window(n, 600) for n in (1, 256, 257, 512, 513)] == [256, 256, 512, 512, 600]
    # Past 2,048 slots, four windows an octave: a whole number of blocks, at most a quarter more than filled.
    assert [attention_window(n, 8192) for n in (1025, 2048, 2049, 2560, 2561, 4097, 8000)] == [
        2048, 2048, 2560, 2560, 3072, 5120, 8192]
    # Chunks of a 300-token prompt: 0..63 (window 256), 64, 128, 192 (256), 256 (512).
    assert sorted(engine.chunk_starts(300)) == [(64, 256), (64, 512)]
    assert sorted(engine.chunk_starts(300, all_buckets=True)) == [(16, 256), (32, 256), (64, 256), (64, 512)]
    with CompileLog() as log:
        engine.warmup(300, 40, all_buckets=True)
        compiled = log.compiles()
        mark = len(log.events)
        rng = np.random.default_rng(0)
        for n, new in ((3, 5), (20, 9), (64, 3), (250, 12), (300, 40)):
            model.generate(rng.integers(0, 300, n).tolist(), new, stop_token_ids=[])
        assert log.compiles(mark) == 0, log.events[mark:]
    print(f"KV-2: warm-up compiled {compiled} programs; the requests after it compiled none")


def test_kv2_decode_updates_the_donated_cache_in_place(model):
    engine = Engine(model.params, model.config, 64, batch_size=2, prefill_chunk=CHUNK)
    engine.prefill(0, [1, 2, 3], 0, 3)
    old = engine._state().cache
    pointers = [a.unsafe_buffer_pointer() for a in old.k + old.v]
    for j in range(3):
        engine.decode([3 + 4 * j, 0], [True, False])
    assert all(a.is_deleted() for a in old.k + old.v), "the cache was not donated"
    cache = engine._state().cache
    assert [a.unsafe_buffer_pointer() for a in cache.k + cache.v] == pointers, "decode reallocated the cache"


def test_kv3_request_longer_than_cache_fails_before_any_work(model):
    with pytest.raises(qj.ContextLengthError, match="exceeds the KV cache length 64"):
        model.generate(list(range(1, 61)), max_new_tokens=5)
    with pytest.raises(qj.ContextLengthError):
        model.stream(list(range(1, 65)), 1)  # raises on the call, before any iteration
    with pytest.raises(qj.ContextLengthError):  # filling the cache needs room for one token
        model.stream(list(range(1, 65)), sampling=qj.SamplingParams(max_new_tokens=None))
    # The model still serves a request that fits, up to the last slot of the cache.
    assert len(model.generate([1, 2, 3], max_new_tokens=4, stop_token_ids=[])) == 4
    full = model.complete(list(range(1, 50)), sampling=qj.SamplingParams(max_new_tokens=None, stop_token_ids=()))
    assert full.finish_reason == "cache_full" and len(full.token_ids) == 64 - 49


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
        model.generate([1, 2], max_new_tokens=-1)
    with pytest.raises(qj.Qwen3MoeError, match="no tokenizer"):
        model.generate("text", max_new_tokens=4)
    with pytest.raises(qj.SamplingError, match="at most 20"):
        model.generate([1, 2], max_new_tokens=2, logprobs=21)
    with pytest.raises(qj.Qwen3MoeError, match="power of two"):
        Engine(model.params, model.config, 64, prefill_chunk=24)
    with pytest.raises(qj.Qwen3MoeError, match="decode_steps"):
        Engine(model.params, model.config, 64, decode_steps=0)


def test_a_last_chunk_and_a_decode_block_past_the_end_of_the_cache_fill_it_exactly():
    """A 72-slot cache, chunks of 16: a 68-token prompt's last chunk covers slots 64..79 and the decode blocks
    of 3 run past slot 71; what lies past the cache is dropped, and the request fills the cache with the
    tokens of full forward passes."""
    model = qj.random_model("tiny", seed=3, std=0.2, max_seq_len=72, prefill_chunk=16, decode_steps=3)
    prompt = np.random.default_rng(0).integers(0, 256, 68).tolist()
    out = model.complete(prompt, sampling=qj.SamplingParams(max_new_tokens=None, stop_token_ids=()))
    assert out.finish_reason == "cache_full" and len(out.token_ids) == 4
    reference = []
    for _ in range(4):
        reference.append(int(np.argmax(model.logits(prompt + reference)[-1])))
    assert out.token_ids == reference
