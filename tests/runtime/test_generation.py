"""The generation loop end to end on a small model: STR-1..3, stop strings, finish reasons, usage,
logprobs, and the SAM/REP contracts measured on generated text (CONTRACTS.md, Sampling and Streaming)."""

from __future__ import annotations

import copy
import random
from collections import Counter

import jax
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.runtime.text_stream import StopStrings

SEEDED = qj.SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=11)
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def model(bpe_tokenizer):
    """Random weights under a real 512-token BPE vocabulary, so tokens are multi-character pieces."""
    config = qj.preset("tiny").replace(vocab_size=512, mlp_only_layers=(), bos_token_id=0, eos_token_ids=(2,))
    model = qj.random_model(config, seed=3, std=0.2, max_seq_len=48)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend)
    return model


@pytest.fixture(scope="module")
def free_run(model):
    """32 greedy tokens with no stop ids: the reference the stopping tests cut."""
    return model.generate(PROMPT, 32, stop_token_ids=[])


@pytest.mark.parametrize("sampling", [qj.SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_str3_streamed_tokens_and_text_equal_the_collected_result(model, sampling):
    events = list(model.stream(PROMPT, 24, sampling, stop_token_ids=[]))
    ids = [e.token_id for e in events]
    assert ids == model.generate(PROMPT, 24, sampling, stop_token_ids=[])
    assert "".join(e.text for e in events) == model.tokenizer.decode(ids)
    assert [e.finish_reason for e in events] == [None] * 23 + ["max_new_tokens"]
    assert all(e.usage is None for e in events[:-1]) and events[-1].usage.completion_tokens == 24


def test_str1_callback_sees_every_token_before_the_event_and_the_stop_check(model, free_run):
    stop = free_run[5]
    seen, events = [], []
    for event in model.stream(PROMPT, 32, stop_token_ids=[stop], on_token=seen.append):
        events.append(event.token_id)
        # The callback already saw this token (with decode_steps > 1 it may have seen the rest of its block).
        assert seen[: len(events)] == events
    expected = free_run[: free_run.index(stop) + 1]
    assert seen == events == expected  # the stop token included, nothing after it


@pytest.mark.parametrize("k", [1, 3, 7])
def test_str2_callback_returning_false_stops_after_exactly_k_tokens(model, free_run, k):
    calls = []

    def on_token(token):
        calls.append(token)
        return len(calls) < k

    result = model.complete(PROMPT, 32, stop_token_ids=[], on_token=on_token)
    assert result.token_ids == free_run[:k] and calls == free_run[:k]
    assert result.finish_reason == "cancelled"
    assert model.scheduler.running == 0  # the request's row is free again
    assert model.generate(PROMPT, 32, stop_token_ids=[]) == free_run  # and the next request is unharmed


def test_str2_closing_the_iterator_ends_the_request_and_frees_its_row(model, free_run):
    events = model.stream(PROMPT, 32, stop_token_ids=[])
    assert [next(events).token_id for _ in range(3)] == free_run[:3]
    assert model.scheduler.running == 1  # the running request holds a row
    events.close()
    assert model.scheduler.running == 0
    assert list(events) == []
    assert model.generate(PROMPT, 32, stop_token_ids=[]) == free_run


def test_a_stop_string_spanning_tokens_ends_generation_and_is_never_shown(model, free_run):
    decode = model.tokenizer.decode
    full_text = decode(free_run)
    boundaries = {len(decode(free_run[:j])) for j in range(1, 32) if full_text.startswith(decode(free_run[:j]))}
    # The first printable ASCII 3-character span that crosses a token boundary and occurs nowhere before.
    start = next(a for a in range(len(full_text) - 3) if full_text[a:a + 3].isascii()
                 and full_text[a:a + 3].isprintable() and full_text.index(full_text[a:a + 3]) == a
                 and boundaries & {a + 1, a + 2})
    stop = full_text[start:start + 3]
    events = list(model.stream(PROMPT, 32, stop_token_ids=[], stop=["never appears", stop]))
    assert "".join(e.text for e in events) == full_text[:start]
    assert not any(stop in e.text for e in events)
    assert events[-1].finish_reason == "stop_string"
    # Generation ended with the token that completed the stop string.
    assert len(events) == next(j + 1 for j in range(32) if stop in decode(free_run[: j + 1]))


def test_text_held_back_for_a_stop_string_that_never_completes_is_flushed(model, free_run):
    full_text = model.tokenizer.decode(free_run)
    result = model.complete(PROMPT, 32, stop_token_ids=[], stop=[full_text[-2:] + "\u2603never"])
    assert result.text == full_text and result.finish_reason == "max_new_tokens"


def test_stop_string_filter_against_a_direct_search():
    """StopStrings fed random splits of texts stops at the piece that completes the first stop string to
    appear and passes on exactly the text before it."""
    rng = random.Random(0)
    stops = ["abc", "cab", "bb", "x"]
    for _ in range(1000):
        text = "".join(rng.choice("abcx ") for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randint(0, 5))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        ends = np.cumsum([len(p) for p in pieces])
        # Directly: the first stop string to be complete ends at `first_end`; generation sees text up to the
        # end of that piece, and cuts at the earliest stop string within it.
        first_end = min((text.find(s) + len(s) for s in stops if s in text), default=None)
        if first_end is None:
            stop_piece, expected = None, text
        else:
            stop_piece = int(np.searchsorted(ends, first_end))
            seen = text[: ends[stop_piece]]
            expected = text[: min(seen.find(s) for s in stops if s in seen)]

        f, shown = StopStrings(stops), ""
        for i, piece in enumerate(pieces):
            out, hit = f.push(piece)
            shown += out
            assert hit == (i == stop_piece), (text, pieces)
            if hit:
                break
        else:
            shown += f.flush()
        assert shown == expected, (text, pieces)


def test_finish_reasons_and_usage(model, free_run):
    stop = free_run[4]
    cut = free_run[: free_run.index(stop) + 1]
    prompt = model.encode(PROMPT)
    as_stop = model.complete(PROMPT, 32, stop_token_ids=[stop])
    assert as_stop.token_ids == cut and as_stop.finish_reason == "stop_token"
    assert as_stop.text == model.tokenizer.decode(cut[:-1])  # a stop token shows no text
    # The same id, named as the model's EOS.
    eos_model = copy.copy(model)
    eos_model.config = model.config.replace(eos_token_ids=(stop,))
    events = eos_model.stream(prompt, sampling=qj.SamplingParams(max_new_tokens=32))
    assert [e.finish_reason for e in events][-1] == "eos"

    full = model.complete(PROMPT, sampling=qj.SamplingParams(max_new_tokens=None), stop_token_ids=[])
    assert full.finish_reason == "cache_full" and len(prompt) + len(full.token_ids) == model.max_seq_len
    assert full.token_ids[:32] == free_run

    usage = full.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(full.token_ids))
    assert 0 < usage.time_to_first_token_s < usage.total_s
    assert usage.decode_tokens_per_s == pytest.approx(
        (usage.completion_tokens - 1) / (usage.total_s - usage.time_to_first_token_s), rel=1e-6)


def test_logprobs_are_the_models_log_softmax(model):
    result = model.complete(PROMPT, 6, SEEDED, stop_token_ids=[], logprobs=3)
    prompt = model.encode(PROMPT)
    logits = model.logits(prompt + result.token_ids)[len(prompt) - 1: -1]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for step, (token, lp) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert lp.logprob == pytest.approx(expected[step, token], abs=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-expected[step])[:3].tolist()
        np.testing.assert_allclose([p for _, p in lp.top], np.sort(expected[step])[::-1][:3], atol=1e-4)
    assert model.complete(PROMPT, 6, SEEDED, stop_token_ids=[]).logprobs is None


def test_bad_requests_raise_before_anything_runs(model):
    for kwargs in ({"stop": [""]}, {"max_new_tokens": -1}, {"logprobs": -1}, {"stop_token_ids": [-3]},
                   {"temprature": 0.5}):
        with pytest.raises(qj.SamplingError):
            model.stream(PROMPT, **kwargs)
    no_tokenizer = qj.random_model("tiny", max_seq_len=48)
    no_tokenizer.tokenizer = None
    with pytest.raises(qj.SamplingError, match="stop strings need a model with a tokenizer"):
        no_tokenizer.stream([1, 2, 3], stop=["x"])


def test_sam2_seeded_runs_repeat_and_sam3_seeds_diverge_end_to_end(model):
    first = [model.generate(PROMPT, 8, SEEDED, seed=s, stop_token_ids=[]) for s in range(32)]
    again = [model.generate(PROMPT, 8, SEEDED, seed=s, stop_token_ids=[]) for s in range(32)]
    assert first == again
    distinct = len({ids[0] for ids in first})
    print(f"SAM-3: {distinct} distinct first tokens over 32 seeds")
    assert distinct >= 3


def _repeat_share(model, prompt, penalty, seeds=48, tokens=24):
    """Share of generated tokens that repeat one of the 64 before them, and the token counts."""
    repeats, counts = 0, Counter()
    for seed in range(seeds):
        ids = model.generate(prompt, tokens, qj.SamplingParams(temperature=1.0, seed=seed, repeat_penalty=penalty,
                                                               repeat_last_n=64), stop_token_ids=[])
        context = prompt + ids
        repeats += sum(ids[j] in context[max(0, len(prompt) + j - 64): len(prompt) + j] for j in range(len(ids)))
        counts.update(ids)
    return repeats / (seeds * tokens), counts


def test_rep4_the_penalty_changes_the_outcome_distribution(model):
    prompt = model.encode("abab abab abab abab")
    plain, plain_counts = _repeat_share(model, prompt, 1.0)
    penalised, penalised_counts = _repeat_share(model, prompt, 1.2)
    total = sum(plain_counts.values())
    tv = 0.5 * sum(abs(plain_counts[t] - penalised_counts[t]) for t in plain_counts | penalised_counts) / total
    print(f"REP-4: tokens repeating one of the last 64: {plain:.1%} without penalty, {penalised:.1%} with 1.2/64; "
          f"total variation between the token distributions {tv:.2f}")
    assert penalised < plain
    assert tv > 0.05


def _without_timing(events):
    return [(e.token_id, e.text, e.logprobs, e.finish_reason, e.usage and e.usage.completion_tokens) for e in events]


def test_decode_steps_give_the_events_of_one_step_per_call(model, free_run):
    """decode_steps k in {1, 3, 4}: the same events (ids, text, logprobs, finish reasons) for a stop token and a
    stop string landing mid-block, max_tokens no multiple of k and a cancel from on_token; the tokens a block
    computed past the end never reach the consumer or the callback."""
    text = model.tokenizer.decode(free_run)
    stop_string = next(text[a:a + 2] for a in range(len(model.tokenizer.decode(free_run[:4])), len(text) - 2)
                       if text[a:a + 2].strip() and text[a:a + 2] not in text[:a + 1])
    cases = [dict(max_new_tokens=11, stop_token_ids=()),
             dict(max_new_tokens=32, stop_token_ids=(free_run[7],)),
             dict(max_new_tokens=32, stop_token_ids=(), stop=(stop_string,)),
             dict(max_new_tokens=13, stop_token_ids=(), logprobs=3, temperature=0.9, seed=4),
             dict(max_new_tokens=32, stop_token_ids=(), cancel_after=5)]
    results = {}
    for k in (1, 3, 4):
        stepped = qj.Model(model.config, model.params, model.tokenizer, model.max_seq_len, decode_steps=k)
        for i, case in enumerate(cases):
            case = dict(case)
            cancel_after, seen = case.pop("cancel_after", None), []

            def on_token(token, seen=seen, cancel_after=cancel_after):
                seen.append(token)
                return cancel_after is None or len(seen) < cancel_after

            events = list(stepped.stream(PROMPT, sampling=qj.SamplingParams(**case), on_token=on_token))
            assert seen == [e.token_id for e in events]  # the callback saw no token past the end
            results.setdefault(i, []).append(_without_timing(events))
    for i, runs in results.items():
        assert runs[1] == runs[0] and runs[2] == runs[0], cases[i]
    ends = [runs[0][-1][3] for runs in results.values()]
    assert ends == ["max_new_tokens", "stop_token", "stop_string", "max_new_tokens", "cancelled"]
    assert [len(results[i][0]) for i in (0, 3, 4)] == [11, 13, 5]
    # The stops land inside a block: the first token comes from prefill, then blocks of k end at 1 + m*k.
    for i in (1, 2):
        assert all((len(results[i][0]) - 1) % k for k in (3, 4)), len(results[i][0])
