"""The scheduler (continuous batching): a request's tokens and logprobs are exactly those it gets alone, bit for
bit, whatever shares the batch, whenever it arrives, whichever row it lands in, and whoever is cancelled."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.runtime.generation import Event, collect
from qwen3moe_jax.runtime.scheduler import QueueFull, Scheduler

MAX_BATCH = 4


@pytest.fixture(scope="module")
def model():
    return qj.random_model("tiny", seed=5, std=0.2, max_seq_len=96, max_batch=MAX_BATCH, prefill_chunk=16,
                           decode_steps=2)


def _requests():
    """Different prompt lengths (1 to 3 chunks) and mixed settings: greedy, seeded, penalised, logprobs."""
    rng = np.random.default_rng(0)
    settings = [
        qj.SamplingParams(max_new_tokens=12),
        qj.SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=3, logprobs=3),
        qj.SamplingParams(max_new_tokens=15, temperature=1.2, top_k=20, seed=7),
        qj.SamplingParams(max_new_tokens=7, repeat_penalty=1.5, repeat_last_n=8, logprobs=0),
        qj.SamplingParams(max_new_tokens=10, temperature=0.7, seed=11, stop=("ab",)),
        qj.SamplingParams(max_new_tokens=13),
        qj.SamplingParams(max_new_tokens=11, temperature=1.0, seed=3),
    ]
    lengths = [5, 40, 17, 33, 2, 16, 48]
    return [(rng.integers(0, 256, n).tolist(), dataclass_stop_free(s)) for n, s in zip(lengths, settings, strict=True)]


def dataclass_stop_free(sampling: qj.SamplingParams) -> qj.SamplingParams:
    import dataclasses

    return dataclasses.replace(sampling, stop_token_ids=())


def _result(completion: qj.Completion):
    return completion.token_ids, completion.text, completion.finish_reason, completion.logprobs


@pytest.fixture(scope="module")
def alone(model):
    """Each request run by itself (it holds row 0 of the same max_batch-row engine)."""
    return [_result(model.complete(prompt, sampling=s)) for prompt, s in _requests()]


def test_staggered_arrivals_mixed_sampling_and_a_cancel_change_no_request(model, alone):
    """Requests arrive while others prefill and decode, more than there are rows (so some wait), one is
    cancelled part-way; every other request's tokens, text and logprobs equal its run alone, bit for bit,
    though some ran in rows other than 0."""
    scheduler = model.scheduler
    requests = [model.request(prompt, s) for prompt, s in _requests()]
    boxes = [[] for _ in requests]
    for request, box in zip(requests, boxes, strict=True):
        request.emit = box.append
    cancelled = model.request(list(range(30, 60)), qj.SamplingParams(max_new_tokens=40, temperature=1.0, seed=1))
    cancelled.emit = (cancelled_box := []).append
    arrivals = {0: [0, 1], 1: [cancelled], 3: [2, 3], 4: [4], 7: [5, 6]}
    rows = {}
    for step in range(200):
        for item in arrivals.get(step, []):
            scheduler.submit(requests[item] if isinstance(item, int) else item)
        if step == 9:
            assert cancelled.row is not None and len(cancelled_box) > 0  # it was running when cancelled
            scheduler.cancel(cancelled)
        scheduler.step()
        rows.update({i: r.row for i, r in enumerate(requests) if r.row is not None})
        if step > 10 and all(r.finished for r in requests):
            break
    assert all(r.finished for r in requests) and scheduler.running == 0 and scheduler.queued == 0
    assert cancelled_box[-1] is None and len(cancelled_box) < 41  # ended early, with no error
    assert set(rows.values()) == set(range(MAX_BATCH))  # every row served someone
    for i, box in enumerate(boxes):
        assert box[-1] is None
        assert _result(collect(iter(box[:-1]))) == alone[i], f"request {i} (row {rows[i]})"


@pytest.fixture(scope="module")
def long_model():
    """A cache long enough for the decode window to cross sizes: 256, 512, 1,024 and 1,100 slots (the last capped at
    the cache length, not a power of two)."""
    return qj.random_model("tiny", seed=5, std=0.2, max_seq_len=1100, max_batch=2, decode_steps=2)


@pytest.fixture(scope="module")
def long_model_int8():
    return qj.random_model("tiny", seed=5, std=0.2, max_seq_len=1100, max_batch=2, decode_steps=2, kv_dtype="int8")


GREEDY = qj.SamplingParams(max_new_tokens=150, logprobs=3, stop_token_ids=())


@pytest.mark.parametrize("cache,sampling", [
    ("model", GREEDY),
    ("model", qj.SamplingParams(max_new_tokens=150, temperature=0.9, top_p=0.95, seed=4, logprobs=3,
                                stop_token_ids=())),
    ("int8", GREEDY),
], ids=["greedy", "seeded", "greedy-int8-cache"])
def test_a_short_request_is_bit_for_bit_itself_beside_a_long_one_whatever_window_the_block_reads(cache, sampling,
                                                                                                   request):
    """The decode block reads the window its longest row needs: alone, a 20-token request's blocks read 256
    slots; beside a 900-token one they read 1,024, then 1,100 once the long one passes position 1,022. Attention
    runs in blocks of 256 slots summed in a fixed order, where a block past a row's position adds exact zeros: the
    short request's tokens and logprobs are the same bits either way (and so are the long one's against its own
    run alone). With the int8 cache too: scales multiply each slot's scores and probabilities, a masked slot's
    weight stays exactly 0."""
    long_model = request.getfixturevalue("long_model" if cache == "model" else "long_model_int8")
    rng = np.random.default_rng(1)
    short, long = rng.integers(0, 256, 20).tolist(), rng.integers(0, 256, 900).tolist()
    long_sampling = dataclass_stop_free(qj.SamplingParams(max_new_tokens=160, temperature=1.0, seed=9, logprobs=2))
    alone_short = _result(long_model.complete(short, sampling=sampling))
    alone_long = _result(long_model.complete(long, sampling=long_sampling))
    together = long_model.complete_batch([long, short], [long_sampling, sampling])
    windows = {long_model.engine.decode_window(900 + step) for step in range(0, 150, 2)}
    assert windows == {1024, 1100}  # the windows the long row takes the short one's blocks through
    assert _result(together[1]) == alone_short
    assert _result(together[0]) == alone_long


def test_complete_batch_returns_each_prompt_what_it_gets_alone_in_order(model, alone):
    prompts, settings = zip(*_requests(), strict=True)
    results = model.complete_batch(list(prompts), list(settings))
    assert [_result(c) for c in results] == alone
    # One SamplingParams for all, and a batch smaller than the prompts.
    same = qj.SamplingParams(max_new_tokens=6, stop_token_ids=())
    assert [c.token_ids for c in model.complete_batch(list(prompts), same)] == [
        model.generate(p, sampling=same) for p in prompts]
    with pytest.raises(qj.SamplingError, match="one each"):
        model.complete_batch(list(prompts), list(settings)[:2])


def test_the_wait_queue_is_bounded():
    model = qj.random_model("tiny", max_seq_len=32, max_batch=1)
    scheduler = Scheduler(model.engine, max_queue=2)
    for _ in range(3):  # one for the free row, two waiting
        scheduler.submit(model.request([1, 2, 3], qj.SamplingParams(max_new_tokens=2)))
    with pytest.raises(QueueFull, match="3 requests are waiting for a row already \\(max_queue 2\\)"):
        scheduler.submit(model.request([1, 2, 3], qj.SamplingParams(max_new_tokens=2)))
    scheduler.cancel(scheduler.waiting[1])  # it leaves at the next step, and no longer takes a place
    scheduler.submit(model.request([1, 2, 3], qj.SamplingParams(max_new_tokens=2)))


def test_a_cancelled_request_gets_no_token_of_the_block_running_when_it_was_cancelled(model):
    """A cancel from another request's event (so, while a decode block's tokens are being delivered): the
    cancelled request's later tokens of that block are not delivered; it gets only its end."""
    sampling = qj.SamplingParams(max_new_tokens=20, stop_token_ids=())
    scheduler = Scheduler(model.engine)  # a fresh one takes rows 0, 1, ... in turn (least recently used first)
    first, second = model.request([1, 2, 3], sampling), model.request([4, 5, 6], sampling)
    got: list = []
    seen_at_cancel: list[int] = []

    def first_emit(item) -> None:  # first holds row 0: its tokens of a block are delivered before second's
        if isinstance(item, Event) and len(got) >= 3 and not seen_at_cancel:
            seen_at_cancel.append(len(got))
            scheduler.cancel(second)

    first.emit, second.emit = first_emit, got.append
    scheduler.submit(first)
    scheduler.submit(second)
    while not (first.finished and second.finished):
        scheduler.step()
    assert seen_at_cancel and got[-1] is None
    assert len(got) - 1 == seen_at_cancel[0]  # nothing after the cancel but the end


def _penalised_greedy_numpy(model, prompt: list[int], new_tokens: int, penalty: float, last_n: int) -> list[int]:
    """Greedy decoding with llama.cpp's repetition penalty written out in NumPy over the true history: at each
    step, one full forward pass over prompt + generated tokens gives the logits, every distinct id among the
    last `last_n` tokens of that history (the prompt included) has its logit divided by the penalty when
    positive and multiplied by it otherwise, then the argmax."""
    history = list(prompt)
    for _ in range(new_tokens):
        logits = model.logits(history)[-1].astype(np.float64)
        window = set(history[len(history) - last_n:]) if last_n > 0 else set()
        for token in window:
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        history.append(int(np.argmax(logits)))
    return history[len(prompt):]


@pytest.mark.parametrize("last_n", [0, 1, 2, 4, 5, 6, 7, 8, 64])
def test_the_repetition_window_against_numpy_over_the_true_history(model, last_n):
    """repeat_last_n from 0 (off) and 1 (the last token only) to more than the whole history, around the
    prompt's length (6). A large penalty makes every token in the window lose; for this prompt the reference's
    output changes between 0|1, 1|2, 4|5 and 7|8 (checked), so a window one token too long or too short at any
    of those values fails."""
    prompt = [7, 7, 12, 7, 30, 12]
    sampling = qj.SamplingParams(max_new_tokens=12, repeat_penalty=50.0, repeat_last_n=last_n, stop_token_ids=())
    ours = model.generate(prompt, sampling=sampling)
    assert ours == _penalised_greedy_numpy(model, prompt, 12, 50.0, last_n)
    if last_n in (1, 6):  # the windows of one and of the prompt do change what the model says
        assert ours != model.generate(prompt, sampling=qj.SamplingParams(max_new_tokens=12, stop_token_ids=()))
