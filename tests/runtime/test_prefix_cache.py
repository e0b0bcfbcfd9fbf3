"""Prefix caching (runtime/prefix_cache.py): a request that reuses the KV of a prefix some row holds gets the tokens
and logprobs of its cold run (the prefix cache off), bit for bit, alone and batched, and reports what it reused;
records are replaced least recently used first, and dropped whenever the device state they describe may be gone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.runtime.generation import collect
from qwen3moe_jax.runtime.prefix_cache import Placement, PrefixCache

C = 16  # the prefill chunk of these tests
SHAPE = dict(seed=5, std=0.2, max_seq_len=128, max_batch=3, prefill_chunk=C, decode_steps=2)
BASE = np.random.default_rng(0).integers(0, 256, 70).tolist()
GREEDY = qj.SamplingParams(max_new_tokens=8, logprobs=2, stop_token_ids=())
SEEDED = qj.SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, repeat_penalty=1.3,
                           repeat_last_n=64, logprobs=2, stop_token_ids=())
# A penalty that no token in its window survives, whose window reaches back into the reused prefix: the row's token
# history must be the cold run's there (logprobs are the model's, before the penalty: only the tokens show it).
PENALISED = qj.SamplingParams(max_new_tokens=8, repeat_penalty=50.0, repeat_last_n=64, logprobs=2, stop_token_ids=())


@pytest.fixture(scope="module")
def cold():
    return qj.random_model("tiny", prefix_cache=False, **SHAPE)


@pytest.fixture
def warm():
    """A fresh model with the prefix cache on (the same weights; its steps are compiled once for both)."""
    return qj.random_model("tiny", **SHAPE)


def _result(completion: qj.Completion):
    return completion.token_ids, completion.text, completion.finish_reason, completion.logprobs


def _records(model: qj.Model) -> list[list[int]]:
    return [r.tolist() for r in model.scheduler.prefix_cache.records]


# (prompt, the tokens it reuses) in order, on one fresh model: what each reuses depends on what ran before it.
SEQUENCE = [
    (BASE, 0),  # cold; its row records its whole chunks, BASE[:64]
    (BASE, 64),  # the same prompt: every whole chunk (64 of 70)
    (BASE[:64], 48),  # entirely a cached prefix, ending on a chunk boundary: its last chunk runs again
    (BASE[:50] + [1, 2, 3], 48),  # diverges inside chunk [48, 64): up to that chunk
    (BASE[:32] + [7] * 38, 32),  # diverges at a chunk boundary
    (np.random.default_rng(1).integers(0, 256, 40).tolist(), 0),  # shares nothing: another row (least recently used)
    (BASE + [9] * 10, 32),  # the first row now holds BASE[:32] + [7] * 32
    (BASE[:10], 0),  # shorter than a chunk: nothing to reuse
]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, PENALISED], ids=["greedy", "seeded", "penalised"])
def test_reused_prefixes_give_the_cold_runs_tokens_and_logprobs_bit_for_bit(warm, cold, sampling):
    """Each prompt of SEQUENCE reuses the prefix it shares with a row's record, in whole chunks and short of its last
    chunk; its tokens, text, finish reason and logprobs equal those of the same request without the prefix cache,
    bit for bit. (Reusing a prefix that is not a whole number of chunks, the rounding removed, also gave the cold
    bits on CPU for this model and the `small` preset: the rounding is what makes every chunk run one the cold run
    runs, which holds on any backend, not something these tests can see fail on CPU.)"""
    for i, (prompt, cached) in enumerate(SEQUENCE):
        got, expected = warm.complete(prompt, sampling=sampling), cold.complete(prompt, sampling=sampling)
        assert (got.usage.cached_tokens, expected.usage.cached_tokens) == (cached, 0), i
        assert _result(got) == _result(expected), i
        assert got.usage.prompt_tokens == len(prompt)
    assert warm.scheduler.cached_tokens == sum(cached for _, cached in SEQUENCE)
    # The last, reusing nothing, took the least recently used row (never used) and holds no whole chunk.
    assert _records(warm) == [BASE + [9] * 10, SEQUENCE[5][0][:32], []]


def test_requests_admitted_together_copy_the_prefix_a_busy_row_holds(warm, cold):
    """While A decodes, B and C arrive together: no free row holds their prefixes, A's busy row does, so each takes a
    free row and has A's prefix copied into it on the device (A's own KV and tokens are untouched); D waits for a row
    and then reuses a freed one. Every request gets its cold run's tokens and logprobs, bit for bit."""
    a = BASE + [5] * 20
    prompts = {"A": a, "B": BASE[:60] + [3] * 10, "C": a[:85] + [4] * 8, "D": BASE[:20] + [8] * 20}
    settings = {"A": dataclasses.replace(SEEDED, max_new_tokens=24), "B": SEEDED, "C": PENALISED, "D": GREEDY}
    scheduler = warm.scheduler
    ops = []
    scheduler.call = lambda op, **kwargs: ops.append((op, kwargs)) or warm.engine.call(op, **kwargs)
    requests = {name: warm.request(prompts[name], settings[name]) for name in prompts}
    boxes = {name: [] for name in prompts}
    for name, request in requests.items():
        request.emit = boxes[name].append
    scheduler.submit(requests["A"])
    while not requests["A"].decoding:
        scheduler.step()
    for name in "BCD":
        scheduler.submit(requests[name])
    while not all(r.finished for r in requests.values()):
        scheduler.step()
    copies = [kwargs for op, kwargs in ops if op == "copy_row"]
    rows = {name: r.row for name, r in requests.items()}
    assert copies == [dict(src=rows["A"], dst=rows["B"]), dict(src=rows["A"], dst=rows["C"])]
    assert {name: r.cached for name, r in requests.items()} == {"A": 0, "B": 48, "C": 80, "D": 16}
    for name, box in boxes.items():
        assert box[-1] is None
        assert _result(collect(iter(box[:-1]))) == _result(cold.complete(prompts[name], sampling=settings[name])), name


def test_a_row_still_prefilling_lends_only_the_chunks_it_has_written(warm, cold):
    """B arrives after A's first two chunks: A's row holds A[:32] so far, and that is all B copies and reuses."""
    a = BASE + [5] * 20
    scheduler = warm.scheduler
    first = warm.request(a, SEEDED)
    first.emit = lambda item: None
    scheduler.submit(first)
    for _ in range(2):
        scheduler.step()
    assert first.prefilled == 32 and not first.decoding
    second = warm.request(a + [6] * 3, PENALISED)
    events = list(scheduler.events(second))
    assert second.cached == 32 and second.row != first.row
    assert _result(collect(iter(events))) == _result(cold.complete(a + [6] * 3, sampling=PENALISED))


def test_copy_row_copies_a_rows_keys_values_and_history_and_nothing_else(warm):
    warm.complete(BASE, sampling=GREEDY)
    engine = warm.engine
    before = [np.asarray(k) for k in engine.cache.k], np.asarray(engine._state().history)
    engine.call("copy_row", src=0, dst=2)
    after = [np.asarray(k) for k in engine.cache.k], np.asarray(engine._state().history)
    for b, a in zip(before[0] + [before[1]], after[0] + [after[1]], strict=True):
        assert np.array_equal(a[2], b[0]) and np.array_equal(a[:2], b[:2])


def test_free_rows_are_taken_least_recently_used_first_and_records_are_replaced(warm, cold):
    """More distinct prompts than rows: each takes the least recently used row, whose record it replaces; a prompt
    whose record was evicted reuses nothing (and gets its cold tokens), one whose record survives reuses it. The
    records are one per row, each at most the prompt it came from: nothing grows with the requests served."""
    prompts = [np.random.default_rng(10 + i).integers(0, 256, 40).tolist() for i in range(5)]
    rows = []
    for prompt in prompts:
        got = warm.complete(prompt, sampling=GREEDY)
        assert got.usage.cached_tokens == 0
        rows.append(_records(warm).index(prompt[:32]))
    assert rows == [0, 1, 2, 0, 1]
    assert _records(warm) == [prompts[3][:32], prompts[4][:32], prompts[2][:32]]
    again = warm.complete(prompts[0], sampling=SEEDED)  # evicted: takes row 2, the least recently used
    assert again.usage.cached_tokens == 0 and _result(again) == _result(cold.complete(prompts[0], sampling=SEEDED))
    assert _records(warm) == [prompts[3][:32], prompts[4][:32], prompts[0][:32]]
    kept = warm.complete(prompts[3] + [1, 2], sampling=SEEDED)
    assert kept.usage.cached_tokens == 32
    assert _result(kept) == _result(cold.complete(prompts[3] + [1, 2], sampling=SEEDED))


def test_a_failed_step_drops_every_record(warm, cold):
    warm.complete(BASE, sampling=GREEDY)
    scheduler, engine = warm.scheduler, warm.engine

    def failing(op, **kwargs):
        if op == "decode":
            raise RuntimeError("injected device failure")
        return engine.call(op, **kwargs)

    scheduler.call = failing
    with pytest.raises(qj.Qwen3MoeError, match="injected device failure"):
        warm.complete(BASE, sampling=GREEDY)  # it reused BASE[:64], then its first decode block failed
    assert _records(warm) == [[], [], []]
    scheduler.call = engine.call
    got = warm.complete(BASE, sampling=GREEDY)
    assert got.usage.cached_tokens == 0 and _result(got) == _result(cold.complete(BASE, sampling=GREEDY))


def test_steps_run_on_the_engine_directly_drop_the_records(warm):
    """A warm-up (or a benchmark) runs steps on the engine behind the scheduler's back, writing row 0: what the
    records said of the rows may be false, so the next admission forgets them."""
    assert warm.complete(BASE, sampling=GREEDY).usage.cached_tokens == 0
    assert warm.complete(BASE, sampling=GREEDY).usage.cached_tokens == 64
    warm.engine.warmup(20, 4)
    assert warm.complete(BASE, sampling=GREEDY).usage.cached_tokens == 0


def test_placement_prefers_the_longest_reuse_then_the_least_recently_used_row():
    cache = PrefixCache(rows=4, chunk=4)
    prompt = list(range(20))
    assert cache.place(prompt, free=[1, 2, 3], busy=[0]) == Placement(1, 0)  # no records: the oldest free row
    cache.records = [np.arange(12), np.arange(8), np.array([0, 1, 2, 9]), np.arange(20)]
    cache.free(1)  # row 1 is now the most recently used
    assert cache.place(prompt, free=[1, 2], busy=[0, 3]) == Placement(2, 16, source=3)  # a busy row holds most
    assert cache.records[2].tolist() == list(range(16))
    assert cache.place(prompt, free=[0, 1], busy=[2, 3]) == Placement(0, 16, source=2)  # ties go to the lowest
    cache.enabled = False
    assert cache.place(prompt, free=[1, 3], busy=[0, 2]) == Placement(3, 0)  # row 3 was freed before row 1
    assert cache.records[3].size == 0


def test_an_int8_kv_cache_is_copied_with_its_scales():
    """With kv_dtype "int8" a row is int8 keys and values and their float16 scales: a prefix copied from a busy row
    (both kinds of buffer) gives the cold run's tokens and logprobs, bit for bit."""
    warm, cold = (qj.random_model("tiny", kv_dtype="int8", prefix_cache=on, **SHAPE) for on in (True, False))
    scheduler = warm.scheduler
    first = warm.request(BASE + [5] * 20, dataclasses.replace(SEEDED, max_new_tokens=24))
    first.emit = lambda item: None
    scheduler.submit(first)
    while not first.decoding:
        scheduler.step()
    prompt = BASE[:60] + [3] * 10
    second = warm.request(prompt, PENALISED)
    events = list(scheduler.events(second))
    assert second.cached == 48 and second.row != first.row
    assert _result(collect(iter(events))) == _result(cold.complete(prompt, sampling=PENALISED))
