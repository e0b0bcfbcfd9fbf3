"""The sampler (SAM-1..5, REP-1..4 of CONTRACTS.md) on synthetic logits, against a NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3moe_jax.errors import SamplingError
from qwen3moe_jax.runtime import sampling
from qwen3moe_jax.runtime.sampling import SamplerState, SamplingParams

# Jitted as in the decode step (and so each test does not dispatch the binary searches op by op).
penalize_repeats, filter_logits, sample = map(jax.jit, (sampling.penalize_repeats, sampling.filter_logits,
                                                       sampling.sample))

V = 64


def np_penalize(logits, context, penalty, window):
    """The contract, literally: each distinct token of the last `window` context tokens."""
    out = logits.copy()
    for token in set(context[len(context) - window:] if window else []):
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


def np_filter(logits, temperature, top_k, top_p):
    out = logits / temperature
    if top_k > 0:
        out = np.where(out < np.sort(out)[::-1][top_k - 1], -np.inf, out)
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        probs = np.exp(out[order] - out[order][0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        dropped = order[before >= top_p]
        out[dropped] = -np.inf
    return out


def _history(context, length=32):
    history = np.zeros((1, length), np.int32)
    history[0, :len(context)] = context
    return jnp.asarray(history), jnp.asarray([len(context)])


def _penalize(logits, context, penalty, window):
    history, length = _history(context)
    return np.asarray(penalize_repeats(jnp.asarray(logits[None]), history, length, jnp.asarray([penalty]),
                                      jnp.asarray([window])))[0]


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal(V).astype(np.float32) * 3


CONTEXT = [5, 9, 9, 30, 1, 5, 63, 2, 40, 41, 42]


def test_rep1_penalty_one_or_window_zero_is_bit_identical(logits):
    assert np.array_equal(_penalize(logits, CONTEXT, 1.0, 64), logits)
    assert np.array_equal(_penalize(logits, CONTEXT, 1.7, 0), logits)


def test_rep2_penalty_lowers_repeated_tokens_positive_and_negative():
    logits = np.linspace(-4, 4, V).astype(np.float32)
    negative, positive = 3, 60
    assert logits[negative] < 0 < logits[positive]
    out = _penalize(logits, [negative, positive], 1.5, 64)
    assert out[positive] == pytest.approx(logits[positive] / 1.5)
    assert out[negative] == pytest.approx(logits[negative] * 1.5)
    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    assert softmax(out)[positive] < softmax(logits)[positive]
    assert softmax(out)[negative] < softmax(logits)[negative]


@pytest.mark.parametrize("window", [0, 2, 8, 64])
def test_rep3_window_bounds_the_effect(logits, window):
    out = _penalize(logits, CONTEXT, 1.3, window)
    np.testing.assert_allclose(out, np_penalize(logits, CONTEXT, 1.3, window), rtol=1e-6)
    recent = set(CONTEXT[len(CONTEXT) - window:]) if window else set()
    untouched = [t for t in range(V) if t not in recent]
    assert np.array_equal(out[untouched], logits[untouched])
    assert all(out[t] != logits[t] for t in recent)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8),
                                                        (0.9, 20, 0.5), (2.0, 3, 0.99), (1.0, 0, 0.05)])
def test_filtered_distribution_matches_numpy_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(top_k)
    for _ in range(5):
        logits = rng.standard_normal(V).astype(np.float32) * 2
        ours = np.asarray(filter_logits(jnp.asarray(logits[None]), jnp.asarray([temperature]),
                                        jnp.asarray([top_k]), jnp.asarray([top_p])))[0]
        ref = np_filter(logits, temperature, top_k, top_p)
        assert np.array_equal(np.isfinite(ours), np.isfinite(ref))
        kept = np.isfinite(ref)
        np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_cutoffs_at_qwen_vocabulary_size_match_sorting():
    """At 151,936 tokens the binary searches cut where sorting does: top-k exactly (a count), top-p up to
    tokens whose float64 mass before them is within float32 summation error (1e-5) of p."""
    rng = np.random.default_rng(5)
    rows = np.stack([rng.standard_normal(151_936) * 3, rng.standard_normal(151_936) * 0.3,
                     np.concatenate([[40.0, 39.5], rng.standard_normal(151_934)])]).astype(np.float32)
    settings = [(1.0, 50, 1.0), (0.7, 0, 0.5), (1.0, 1000, 0.8)]
    temperature, top_k, top_p = (jnp.asarray(c) for c in zip(*settings, strict=True))
    ours = np.isfinite(np.asarray(filter_logits(jnp.asarray(rows), temperature, top_k, top_p)))
    for row, (t, k, p), kept in zip(rows, settings, ours, strict=True):
        x = row.astype(np.float64) / t
        if k:
            x = np.where(x < np.sort(x)[::-1][k - 1], -np.inf, x)
        order = np.argsort(-x, kind="stable")
        probs = np.exp(x[order] - x[order][0])
        before = np.empty_like(probs)
        before[order] = np.cumsum(probs / probs.sum()) - probs / probs.sum()
        expected = np.isfinite(x) & (before < p if p < 1 else True)
        differ = kept != expected
        assert np.all(np.abs(before[differ] - p) < 1e-5), (k, p, differ.sum())
        assert expected.sum() > 1 and differ.sum() <= 2


def test_top_k_keeps_ties_with_the_kth_value():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 2.0, -1.0, 0.0, 2.0], np.float32)
    out = np.asarray(filter_logits(jnp.asarray(logits[None]), jnp.asarray([1.0]), jnp.asarray([2]),
                                   jnp.asarray([1.0])))[0]
    assert np.isfinite(out).tolist() == [True, False, True, True, True, False, False, True]


def test_top_p_one_is_an_exact_no_op(logits):
    # Rounding can bring the running mass to 1.0 before the last token: top_p = 1.0 must still keep all.
    tiny_tail = np.concatenate([[30.0], np.full(V - 1, -30.0)]).astype(np.float32)
    for x in (logits, tiny_tail):
        out = filter_logits(jnp.asarray(x[None]), jnp.asarray([1.0]), jnp.asarray([0]), jnp.asarray([1.0]))
        assert np.array_equal(np.asarray(out)[0], x)


def _draws(logits, params):
    state = SamplerState.from_params(params)
    history, length = _history([0])
    batch = len(params)
    return np.asarray(sample(jnp.asarray(np.tile(logits, (batch, 1))), state, jnp.tile(history, (batch, 1)),
                             jnp.tile(length, batch)))


def test_draws_follow_the_filtered_distribution(logits):
    params = [SamplingParams(temperature=0.8, top_k=12, top_p=0.9, seed=s) for s in range(4000)]
    counts = np.bincount(_draws(logits, params), minlength=V) / len(params)
    ref = np_filter(logits, 0.8, 12, 0.9)
    probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
    assert np.all(counts[probs == 0] == 0)
    np.testing.assert_allclose(counts, probs, atol=0.025)


def test_sam1_sam4_greedy_cases_take_the_argmax(logits):
    cases = [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.3, seed=7),
             SamplingParams(temperature=5.0, top_k=1, seed=1), SamplingParams(temperature=5.0, top_k=1, seed=2)]
    assert (_draws(logits, cases) == np.argmax(logits)).all()


def test_sam2_sam3_seeds_reproduce_and_diverge():
    flat = np.random.default_rng(1).standard_normal(V).astype(np.float32) * 0.1
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(32)]
    first = _draws(flat, params)
    assert np.array_equal(first, _draws(flat, params))
    assert len(set(first.tolist())) >= 3


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0},
                                    {"top_p": 1.5}, {"repeat_penalty": 0.0}, {"repeat_penalty": -1.0},
                                    {"top_k": -1}, {"repeat_last_n": -2}, {"seed": -1},
                                    {"seed": 2**32}, {"seed": 1.5}])
def test_sam5_bad_parameters_are_refused(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_seeded_generation_reproduces_and_new_parameters_do_not_recompile():
    """SAM-2 in process, end to end; sampling parameters are traced values, so no recompilation."""
    import qwen3moe_jax as qj
    from qwen3moe_jax.runtime.engine import decode_block as decode_step
    from qwen3moe_jax.runtime.engine import prefill_chunk as prefill_step

    model = qj.random_model("tiny", std=0.2, max_seq_len=40)  # a cache length only this test uses
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5)
    first = model.generate([1, 2, 3], 12, params, stop_token_ids=[])
    assert model.generate([1, 2, 3], 12, params, stop_token_ids=[]) == first
    compiled = prefill_step._cache_size(), decode_step._cache_size()
    outputs = [model.generate([1, 2, 3], 12, p, stop_token_ids=[]) for p in (
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=6), SamplingParams(temperature=0.5, seed=1),
        SamplingParams(repeat_penalty=1.3, repeat_last_n=8), SamplingParams())]
    assert (prefill_step._cache_size(), decode_step._cache_size()) == compiled
    assert outputs[0] != first  # another seed, another draw
    assert outputs[3] == model.generate([1, 2, 3], 12, SamplingParams(temperature=3.0, top_k=1, seed=9),
                                        stop_token_ids=[])  # SAM-4 end to end


def test_top_k_and_window_past_int32_mean_all_and_draw_the_same_tokens(logits):
    """Sizes past int32 cannot reach the device as they are; any k >= vocab keeps every token, any window >= the
    context covers all of it, so they are held at int32's maximum and draw what k = vocab / window = context do."""
    huge = [SamplingParams(temperature=1.0, top_k=10**12, repeat_penalty=1.3, repeat_last_n=10**12, seed=s)
            for s in range(8)]
    exact = [SamplingParams(temperature=1.0, top_k=V, repeat_penalty=1.3, repeat_last_n=32, seed=s)
             for s in range(8)]
    assert np.array_equal(_draws(logits, huge), _draws(logits, exact))
