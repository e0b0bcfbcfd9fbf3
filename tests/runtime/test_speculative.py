"""Speculative decoding (runtime/speculative.py): the verify step keeps exactly the tokens plain decoding makes
(greedy, seeded, penalised, with stops, logprobs and constraints, under continuous batching), the sampled tokens
follow the target's distribution (chi-square on a tiny vocabulary), the n-gram drafter and the back-off."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.runtime.speculative import DraftBudget, NgramDrafter, SpeculativeConfig, Speculator

REPEATING = ("class Connection:\n    def __init__(self, host, port, user):\n        self.host = host\n"
             "        self.port = port\n        self.user = user\n\n    def reset(self, host, port, user):\n")


@pytest.fixture(scope="module")
def models():
    """The bundled model plain and with prompt lookup, 3 rows each. With one decode step per call, a verify step
    pays whenever a row has a draft, so rows speculate beside rows that do not."""
    return (qj.load(progress=False, max_batch=3),
            qj.load(progress=False, max_batch=3, decode_steps=1, speculative="ngram"))


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
    plain, spec = models
    prompts = [REPEATING, "def fibonacci(n):\n", "    if not isinstance(value, str):\n        raise",
               "# Copyright 2001 Python Software Foundation\n", "for i in range(10):\n    print(i)\n" * 3]
    for prompt in prompts:
        assert spec.generate(prompt, 64) == plain.generate(prompt, 64), prompt


class _FixedDrafter:
    """Drafts `token` k times: a point-mass draft that is sometimes right and sometimes wrong."""

    def __init__(self, token: int):
        self.token = token

    def draft(self, requests, ks) -> list[list[int]]:
        return [[self.token] * k for k in ks]


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


def test_ngram_drafter_continues_the_latest_match_of_the_longest_ngram():
    drafter = NgramDrafter(3)
    ctx = np.array([7, 1, 2, 3, 4, 5, 9, 2, 3, 8, 1, 2, 3])
    assert drafter.propose(ctx, 2) == [4, 5]  # "1 2 3" occurs at 1: the 3-gram wins over the later "2 3" at 7
    assert drafter.propose(np.array([5, 6, 7, 5, 6]), 3) == [7, 5, 6]  # only "5 6" matches: what followed it
    assert drafter.propose(np.array([5, 6, 7, 6]), 3) == []  # one token is too weak a cue
    assert drafter.propose(np.array([1, 2, 3]), 4) == []


def test_a_row_whose_drafts_fail_backs_off_and_one_whose_drafts_hold_keeps_drafting():
    budget = DraftBudget()
    for _ in range(DraftBudget.MISSES_TO_PAUSE):
        assert budget.drafting()
        budget.record(drafted=7, accepted=0)
    paused = [budget.drafting() for _ in range(4)]
    assert paused == [False] * 4  # a pause of 4 decode calls
    for _ in range(DraftBudget.MISSES_TO_PAUSE):
        budget.record(drafted=7, accepted=0)
    assert sum(not budget.drafting() for _ in range(12)) == 8  # the next pause is twice as long
    good = DraftBudget()
    for _ in range(5):
        good.record(drafted=7, accepted=7)
    assert good.expected_tokens(7) > 7 and good.drafting()

    # A verify step is run only where the drafts are expected to bring more than a decode block.
    speculator = Speculator(SpeculativeConfig(draft_tokens=7))
    speculator.drafter = _FixedDrafter(3)

    @dataclasses.dataclass(eq=False)
    class Row:
        prompt: list
        output: list

    row = Row([1, 2], [])
    assert speculator.drafts([row], [7], decode_steps=4) == [[3] * 7]
    assert speculator.drafts([row], [1], decode_steps=4) is None  # one token of room: a decode block brings more
    speculator.budget(row).acceptance = 0.2
    assert speculator.drafts([row], [7], decode_steps=4) is None


def test_bad_speculative_settings_are_config_errors():
    for bad in (dict(method="medusa"), dict(draft_tokens=0), dict(ngram=0)):
        with pytest.raises(ConfigError):
            SpeculativeConfig(**bad)
    with pytest.raises(ConfigError):
        qj.random_model("tiny", speculative="nope")
