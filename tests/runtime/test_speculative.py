"""Speculative decoding (runtime/speculative.py): the verify step keeps exactly the tokens plain decoding makes
(greedy, seeded, penalised, with stops, logprobs and constraints, under continuous batching), the sampled tokens
follow the target's distribution (chi-square on a tiny vocabulary), the n-gram drafter and the back-off."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.runtime.speculative import DraftBudget, NgramDrafter, SpeculativeConfig, Speculator

REPEATING = ("class Connection:\n    def __init__(self, host, port, user):\n        self.host = host\n"
             "        self.port = port\n        self.user = user\n\n    def reset(self, host, port, user):\n")


@pytest.fixture(scope="module")
def models():
    """The bundled model plain and with prompt lookup, 3 rows each; two decode steps per call (a verify step runs one
    decode step after its verify round, or none: SpeculativeEngine.tail), to keep the compiles few."""
    return (qj.load(progress=False, max_batch=3),
            qj.load(progress=False, max_batch=3, decode_steps=2, speculative="ngram"))


def _result(c: qj.Completion):
    return c.token_ids, c.text, c.finish_reason


def test_greedy_seeded_penalised_stopped_and_constrained_requests_keep_their_tokens_under_speculation(models):
    """Each request's tokens, text and finish reason with speculation equal plain decoding's, run together in a
    batch (rows speculate, or not, each on its own), and logprobs agree to float rounding."""
    plain, spec = models
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"]}
    cases = [
        (REPEATING, qj.SamplingParams(max_new_tokens=60)),
        ("def add(a, b):\n", qj.SamplingParams(max_new_tokens=40, stop=("return",))),
        ("The file is read once.", qj.SamplingParams(max_new_tokens=50, temperature=0.8, top_k=40, top_p=0.9, seed=4,
                                                     logprobs=2)),
        ("import os\n", qj.SamplingParams(max_new_tokens=45, repeat_penalty=1.3, repeat_last_n=16)),
        ("x = ", qj.SamplingParams(max_new_tokens=20, json_schema=schema, temperature=1.0, seed=2)),
        (REPEATING, qj.SamplingParams(max_new_tokens=33, temperature=0.5, seed=9)),
    ]
    alone = [plain.complete(p, sampling=s) for p, s in cases]
    before = spec.scheduler.speculator.accepted_tokens
    together = spec.complete_batch([p for p, _ in cases], [s for _, s in cases])
    assert spec.scheduler.speculator.accepted_tokens > before + 20  # it did speculate, and drafts were kept
    for a, b in zip(alone, together, strict=True):
        assert _result(b) == _result(a)
        if a.logprobs is not None:
            np.testing.assert_allclose([x.logprob for x in b.logprobs], [x.logprob for x in a.logprobs], atol=1e-4)
            assert [[i for i, _ in x.top] for x in b.logprobs] == [[i for i, _ in x.top] for x in a.logprobs]
    # Seeded runs are reproducible.
    assert _result(spec.complete(cases[2][0], sampling=cases[2][1])) == _result(alone[2])


def test_greedy_tokens_equal_plain_decoding_on_varied_prompts(models):
    """One row at a time (the wide, hot verify steps without decode steps after them), then all together."""
    plain, spec = models
    prompts = [REPEATING, "def fibonacci(n):\n", "    if not isinstance(value, str):\n        raise",
               "# Copyright 2001 Python Software Foundation\n", "for i in range(10):\n    print(i)\n" * 3]
    widths = collections.Counter()
    verify = spec.engine.verify
    spec.engine.verify = lambda drafts, tail, **kw: widths.update([(spec.engine.width(drafts), tail)]) or verify(
        drafts=drafts, tail=tail, **kw)
    try:
        for prompt in prompts:
            assert spec.generate(prompt, 96) == plain.generate(prompt, 96), prompt
    finally:
        spec.engine.verify = verify
    assert {(2, 1), (32, 0)} <= set(widths)  # probes with a decode step after them, and whole loops drafted
    sampling = qj.SamplingParams(max_new_tokens=64)
    assert [c.token_ids for c in spec.complete_batch(prompts, sampling)] == \
        [c.token_ids for c in plain.complete_batch(prompts, sampling)]


def test_a_verify_step_runs_decode_steps_after_it_unless_every_row_is_hot_or_one_is_constrained(models):
    engine = models[1].engine
    assert engine.widths == [2, 4, 8, 32] and engine.decode_steps == 2
    assert engine.tail([[5]], [True], constrained=False) == 1
    assert engine.tail([[5] * 31, [], []], [True, False, False], constrained=False) == 0
    assert engine.tail([[5] * 31, []], [True, True], constrained=False) == 1  # a row without a draft
    assert engine.tail([[5] * 7], [True], constrained=False) == 1
    assert engine.tail([[5], []], [True, True], constrained=True) == 0


@contextlib.contextmanager
def programs_run(engine) -> Iterator[set]:
    """The set of (step, static arguments and shapes) that `engine` runs while the context is entered."""
    seen: set = set()
    run = engine._run

    def recording(step, *args):
        leaves = jax.tree.leaves(args, is_leaf=lambda x: x is None)
        seen.add((step.__name__, tuple(a if isinstance(a, int | str | None) else np.shape(a) for a in leaves)))
        return run(step, *args)

    engine._run = recording
    try:
        yield seen
    finally:
        engine._run = run


def test_warm_up_runs_every_verify_step_requests_run(models):
    """Every verify step the scheduler runs for requests (of each width and tail: constrained and free rows
    together) has the shapes and static arguments of one that the engine's warm-up ran."""
    spec = models[1]
    with programs_run(spec.engine) as warmup:
        spec.engine.warmup(128, 96, all_buckets=True)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with programs_run(spec.engine) as requests:
        spec.complete_batch([REPEATING, "x = ", "def add(a, b):\n"], [
            qj.SamplingParams(max_new_tokens=60), qj.SamplingParams(max_new_tokens=12, json_schema=schema),
            qj.SamplingParams(max_new_tokens=20, temperature=0.8, seed=1)])
    verify = {program for program in requests if program[0] == "verify_block"}
    assert len(verify) >= 3 and {args[-1] for _, args in verify} == {0, 1}  # widths, and both tails
    assert verify <= warmup


class _FixedDrafter:
    """Drafts `token` k times: a point-mass draft that is sometimes right and sometimes wrong."""

    def __init__(self, token: int, most: int | None = None):
        self.token, self.most = token, most

    def draft(self, requests, ks) -> list[list[int]]:
        return [[self.token] * min(k, self.most or k) for k in ks]


def test_sampled_tokens_follow_the_target_distribution_chi_square():
    """A tiny vocabulary (8 tokens), temperature 1, a draft that always proposes the same token: the joint
    distribution of the 2nd and 3rd new tokens (the first comes from prefill; the next two from verify steps, kept
    or redrawn) over 256 seeds matches the target's exact sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2)
    (chi-square, p > 0.001), and every seed's tokens are those of plain sampling."""
    config = qj.preset("tiny").replace(vocab_size=8, eos_token_ids=(7,), bos_token_id=None)
    kwargs = dict(seed=3, std=0.5, max_seq_len=32, max_batch=64, decode_steps=1)
    plain = qj.random_model(config, **kwargs)
    spec = qj.random_model(config, **kwargs, speculative="ngram", draft_tokens=3)
    prompt = [1, 5, 2]
    p = lambda *ids: _softmax(plain.logits(prompt + list(ids))[-1])  # noqa: E731
    expected = np.zeros((8, 8))
    for a, pa in enumerate(p()):
        pb = p(a)
        expected += pa * pb[:, None] * np.array([p(a, b) for b in range(8)])
    expected = expected.reshape(-1)
    spec.scheduler.speculator.drafter = _FixedDrafter(int(np.argmax(expected)) // 8)
    seeds = range(256)
    sampling = [qj.SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, stop_token_ids=()) for s in seeds]
    got = [c.token_ids for c in spec.complete_batch([prompt] * len(sampling), sampling)]
    speculator = spec.scheduler.speculator
    assert 0 < speculator.accepted_tokens < speculator.drafted_tokens  # drafts were kept, and refused
    counts = np.bincount([8 * b + c for _, b, c in got], minlength=64)
    keep = expected * len(got) >= 5  # cells expected to hold at least 5 draws; the rest pooled
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum()) * len(got)
    assert _chi_square_pvalue(observed, wanted) > 1e-3
    assert got == [c.token_ids for c in plain.complete_batch([prompt] * len(sampling), sampling)]


def _chi_square_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test's p-value (the Wilson-Hilferty approximation of the chi-square tail)."""
    x, k = float(np.sum((observed - expected) ** 2 / expected)), len(observed) - 1
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_ngram_drafter_continues_the_latest_match_of_its_ngram():
    drafter = NgramDrafter(3)
    ctx = np.array([7, 1, 2, 3, 4, 5, 9, 2, 3, 8, 1, 2, 3])
    assert drafter.propose(ctx, 2) == [4, 5]  # "1 2 3" occurs at 1 (the later "2 3" at 7 is too short a match)
    assert drafter.propose(np.array([5, 6, 7, 5, 6]), 3) == []  # only "5 6" matches: shorter than the n-gram
    assert NgramDrafter(2).propose(np.array([5, 6, 7, 5, 6]), 3) == [7, 5, 6]
    assert drafter.propose(np.array([1, 2, 3]), 4) == []
    # The latest occurrence (followed by 6, not the earlier one's 5), its match counted back as far as the context
    # agrees: "8 9 1 2 3 4", 6 tokens, so 12 drafted at most, going on around the loop.
    assert NgramDrafter(4).propose(np.array([8, 9, 1, 2, 3, 4, 5, 0, 8, 9, 1, 2, 3, 4, 6, 8, 9, 1, 2, 3, 4]), 31) == [
        6, 8, 9, 1, 2, 3, 4, 6, 8, 9, 1, 2]
    # A loop: the match is the text just before, and the draft goes on past the context's end, around the loop, as
    # far as twice the length of the match (3 tokens, then 8).
    assert drafter.propose(np.array([9, 1, 2, 3, 1, 2, 3]), 8) == [1, 2, 3, 1, 2, 3]
    assert drafter.propose(np.array([9, 1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 3]), 12) == [9, 1, 2, 3] * 3


def _lookups_the_long_way(context: list[int], n: int, k: int) -> list[int]:
    """Prompt lookup by scanning: the tokens after the latest earlier occurrence of the last n tokens, capped at
    twice the match (counted back, up to k), then lookups again in the context with the draft appended."""
    draft, ctx = [], list(context)
    while len(draft) < k and len(ctx) > n:
        starts = [i for i in range(len(ctx) - n) if ctx[i: i + n] == ctx[-n:]]
        if not starts:
            break
        i = starts[-1]
        if not draft:
            matched = n
            while matched < min(i + n, k) and ctx[i + n - 1 - matched] == ctx[-1 - matched]:
                matched += 1
            k = min(k, 2 * matched)
        more = ctx[i + n: i + n + k - len(draft)]
        draft, ctx = draft + more, ctx + more
    return draft


def test_the_drafters_index_grown_call_by_call_drafts_what_scanning_the_whole_context_finds():
    @dataclasses.dataclass(eq=False)
    class Row:
        prompt: list
        output: list

    rng = np.random.default_rng(5)
    for trial in range(60):
        n, vocab = int(rng.integers(1, 5)), int(rng.integers(2, 6))  # few tokens: many repeats and loops
        tokens = rng.integers(0, vocab, 80).tolist()
        drafter, row = NgramDrafter(n), Row(tokens[:10], [])
        while len(row.output) < 70:
            k = int(rng.choice([1, 3, 7, 31]))
            assert drafter.draft([row], [k]) == [_lookups_the_long_way(row.prompt + row.output, n, k)], trial
            row.output += tokens[10 + len(row.output): 10 + len(row.output) + int(rng.integers(1, 6))]


def test_a_row_climbs_the_draft_lengths_while_its_drafts_are_kept_and_pauses_when_refused():
    budget = DraftBudget((1, 3, 7, 31))
    assert budget.length == 1  # a probe first
    for longer in (3, 7, 31, 31):
        budget.record(drafted=budget.length, accepted=budget.length)
        assert budget.length == longer
    budget.record(drafted=31, accepted=10)  # kept in part: a rung down
    assert budget.length == 7 and budget.drafting()
    budget.record(drafted=5, accepted=5)  # a draft cut short and kept whole proves less: the same rung
    assert budget.length == 7
    budget.record(drafted=7, accepted=0)  # refused outright: a pause of one decode call, then a probe again
    assert budget.length == 1
    assert [budget.drafting() for _ in range(2)] == [False, True]
    budget.record(drafted=1, accepted=0)
    assert [budget.drafting() for _ in range(3)] == [False, False, True]  # the next pause is twice as long
    for _ in range(6):
        budget.record(drafted=1, accepted=0)
    assert budget.paused == DraftBudget.MAX_PAUSE
    budget.paused = 0
    budget.record(drafted=1, accepted=1)
    assert budget.pause == DraftBudget.FIRST_PAUSE and budget.length == 3

    speculator = Speculator(SpeculativeConfig(draft_tokens=7))
    speculator.drafter = _FixedDrafter(3)

    @dataclasses.dataclass(eq=False)
    class Row:
        prompt: list
        output: list

    row = Row([1, 2], [])
    assert speculator.drafts([row], [7]) == [[3]]
    speculator.drafter = _FixedDrafter(3, most=2)
    speculator.budget(row).rung = 2
    assert speculator.drafts([row], [7]) == [[3]]  # a draft cut short by the drafter: to the length below
    speculator.budget(row).rung = 0
    speculator.drafter = _FixedDrafter(3)
    speculator.record(row, drafted=1, accepted=1)
    assert speculator.drafts([row, None], [7, 0]) == [[3, 3, 3], []]
    assert speculator.drafts([row], [2]) == [[3, 3]]  # no further than its room
    assert speculator.drafts([row], [0]) is None  # no row drafts: the caller runs a decode block
    speculator.record(row, drafted=3, accepted=0)
    assert speculator.drafts([row], [7]) is None  # paused
    assert speculator.drafts([row], [7]) == [[3]]
    assert (speculator.drafted_tokens, speculator.accepted_tokens) == (4, 1)


def test_bad_speculative_settings_are_config_errors():
    for bad in (dict(method="medusa"), dict(draft_tokens=0), dict(ngram=0)):
        with pytest.raises(ConfigError):
            SpeculativeConfig(**bad)
    default = SpeculativeConfig()
    assert default.draft_tokens == 31 and default.ngram == 4 and default.lengths == (1, 3, 7, 31)
    assert SpeculativeConfig("draft_model").draft_tokens == 7 and SpeculativeConfig("draft_model").lengths == (7,)
    with pytest.raises(ConfigError):
        qj.random_model("tiny", speculative="nope")
