"""The int8 KV cache: int8 keys and values with a float16 scale per token and head, quantized as they are written, the
keys (and queries) rotated by a fixed orthogonal matrix first. Against the float cache on the bundled model: greedy
tokens kept, logit drift, half the bytes of bfloat16."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import qwen3moe_jax as qj
from qwen3moe_jax.model.cache import KVCache, bytes_per_token, check_cache_fits, key_rotation, quantize_kv, rotate_keys
from qwen3moe_jax.model.transformer import forward, lm_logits

# Varied prompts: code of several kinds, prose, a chat turn, numbers, whitespace.
PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n", "    def __init__(self, name, value=None):\n",
    "# Copyright 2001 Python Software Foundation\n", "for i, line in enumerate(lines):\n    if ",
    '"""Return the number of items."""\n', "try:\n    import json\nexcept ImportError:\n",
    "The quick brown fox jumps over the lazy dog. ",
    "<|im_start|>user\nSort a list.<|im_end|>\n<|im_start|>assistant\n", "x = [1, 2, 3, 4, 5]\ny = ",
    "raise ValueError(f\"bad value: {", "@property\ndef size(self):\n        return self._",
]
NEW_TOKENS = 48


def test_quantize_kv_rounds_each_vector_to_within_half_a_step():
    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 32)) * jnp.array([1e-3, 1.0, 40.0])[:, None, None, None]
    x = x.at[0, 0, 0].set(0.0)  # a zero vector stays zero
    values, scale = quantize_kv(x)
    assert values.dtype == jnp.int8 and scale.dtype == jnp.float16 and scale.shape == x.shape[:-1]
    back = values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]
    step = np.asarray(scale, np.float32)[..., None]
    assert np.all(np.abs(np.asarray(back - x)) <= step / 2 + 1e-7)
    assert np.abs(np.asarray(values)).max() == 127 and not np.asarray(back[0, 0, 0]).any()


@pytest.mark.parametrize("head_dim", [32, 128, 96])
def test_key_rotation_is_orthogonal_and_keeps_every_score(head_dim):
    """R R^T = I, so q.k = (q R).(k R); at a power of two, R is a Walsh-Hadamard matrix (scipy's, Sylvester's
    construction) with each row's sign flipped or not, every entry +-1/sqrt(head_dim); otherwise one on each
    power-of-two block of the diagonal (96 = 64 + 32)."""
    r = key_rotation(head_dim).astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(head_dim), atol=1e-6)
    blocks = [head_dim] if head_dim & (head_dim - 1) == 0 else [64, 32]
    hadamard = scipy.linalg.block_diag(*(scipy.linalg.hadamard(n) / np.sqrt(n) for n in blocks))
    signs = np.sign(r[np.arange(head_dim), np.argmax(np.abs(hadamard), axis=1)])
    np.testing.assert_allclose(r, signs[:, None] * hadamard, atol=1e-7)
    assert 0 < (signs < 0).sum() < head_dim
    q, k = jax.random.normal(jax.random.key(1), (2, 5, head_dim)) * 3
    np.testing.assert_allclose(jnp.sum(rotate_keys(q) * rotate_keys(k), -1), jnp.sum(q * k, -1), rtol=1e-5)


def test_rotated_keys_lose_less_to_int8_where_one_channel_dominates():
    """A key whose magnitude sits in one channel (20x the others) sets a coarse int8 step for every other channel;
    rotated, its magnitude is spread over all of them: the scores' error over random queries falls by more than 3x.
    Keys without such a channel lose about as much either way."""
    q, k = jax.random.normal(jax.random.key(2), (2, 512, 32))

    def score_error(keys):
        plain = q @ keys.T
        for rotate in (lambda x: x, rotate_keys):
            values, scale = quantize_kv(rotate(keys))
            back = values.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
            yield float(jnp.sqrt(jnp.mean((rotate(q) @ back.T - plain) ** 2)))

    unrotated, rotated = score_error(k.at[:, 5].multiply(20))
    assert rotated < unrotated / 3
    unrotated, rotated = score_error(k)
    assert 0.7 < rotated / unrotated < 1.3


@pytest.fixture(scope="module")
def bundled():
    return qj.load(progress=False, max_seq_len=256), qj.load(progress=False, max_seq_len=256, kv_dtype="int8")


def test_int8_cache_holds_half_the_bytes_of_bfloat16(bundled):
    """Values: exactly half of bfloat16's bytes; scales: 2 bytes per token and head on top, 2 / head_dim more (1.6% at
    the 30B's head_dim of 128, 6% at the bundled model's 32)."""
    config, int8 = bundled[0].config, bundled[1].engine.cache
    bf16 = sum(a.nbytes for a in KVCache.init(config, 1, 256, jnp.bfloat16).arrays)
    assert {a.dtype for a in int8.k + int8.v} == {jnp.dtype(jnp.int8)}
    assert sum(a.nbytes for a in int8.k + int8.v) == bf16 / 2
    assert sum(a.nbytes for a in int8.arrays) == bf16 / 2 * (1 + 2 / config.head_dim)


@partial(jax.jit, static_argnames=("config", "kv_dtype"))
def _logits(params, tokens, config, kv_dtype):
    """Logits of tokens [1, T] in one pass over a cache of kv_dtype: each key and value is quantized per token and
    head as it is written, so the int8 cache holds what token-by-token decoding writes into it."""
    cache = KVCache.init(config, 1, tokens.shape[1], params.embed.dtype, kv_dtype=kv_dtype)
    hidden, _, _ = forward(params, tokens, jnp.zeros(1, jnp.int32), cache, config)
    return lm_logits(params, hidden)[0]


def test_int8_cache_keeps_the_greedy_tokens_of_the_float_cache(bundled):
    """Done-when of issue 35: at least 90% of greedy tokens kept on varied prompts. Along the float cache's greedy
    path (each prompt's 48 tokens), the int8 cache's argmax is the float cache's token at >= 98% of positions, with
    its logit error (mean 0.0066 measured; 0.0083 without the key rotation). Free-running, each prompt's two greedy
    continuations are compared position by position: after a divergence they continue from different texts, so
    this counts nearly every later token as lost; each divergence comes where the float cache's two best tokens are
    within a small margin (a near-tie). Measured 92.7% (84.7% without the key rotation; on the 256-position bundled
    model 85.6% and 83.9%); scripts/kv_int8_drift.py measures the same over 388 held-out prompts."""
    model, int8 = bundled
    same = total = agree = 0
    errors, margins = [], []
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        ours = model.generate(ids, NEW_TOKENS, stop_token_ids=[])
        theirs = int8.generate(ids, NEW_TOKENS, stop_token_ids=[])
        same += sum(a == b for a, b in zip(ours, theirs, strict=True))
        total += NEW_TOKENS
        path = np.zeros((1, 128), np.int32)
        path[0, : len(ids) + NEW_TOKENS] = ids + ours
        ref, got = (np.asarray(_logits(model.params, path, model.config, kv))[len(ids) - 1: len(ids) - 1 + NEW_TOKENS]
                    for kv in ("model", "int8"))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        errors.append(np.abs(got - ref))
        if ours != theirs:  # the same prefix up to here, so the int8 cache's free-running choice is its argmax here
            d = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
            margins.append(float(ref[d, ours[d]] - ref[d, theirs[d]]))
    errors = np.concatenate(errors)
    print(f"int8 KV cache, bundled model, {len(PROMPTS)} prompts x {NEW_TOKENS} greedy tokens: along the float path "
          f"top-1 {agree / total:.1%}, mean |logit error| {errors.mean():.4f}, max {errors.max():.3f}; free-running "
          f"{same / total:.1%} of tokens equal, {len(margins)} divergences at float top-2 margins "
          f"{[round(m, 3) for m in margins]}")
    assert agree / total >= 0.98 and errors.mean() < 0.0075
    assert same / total >= 0.9 and all(m < 0.25 for m in margins)


def test_int8_cache_decode_equals_its_one_pass_logits(bundled):
    """KV-1 for the int8 cache: prefill and decode write the same quantized keys as one pass does, so the greedy
    continuation's logprobs equal those of the one-pass logits along it."""
    _, int8 = bundled
    ids = int8.encode(PROMPTS[0])
    done = int8.complete(ids, 16, stop_token_ids=[], logprobs=0)
    path = np.zeros((1, 64), np.int32)
    path[0, : len(ids) + 16] = ids + done.token_ids
    logits = np.asarray(_logits(int8.params, path, int8.config, "int8"))[len(ids) - 1: len(ids) + 15]
    expected = jax.nn.log_softmax(logits)[np.arange(16), done.token_ids]
    np.testing.assert_allclose([lp.logprob for lp in done.logprobs], expected, atol=2e-5)


def test_a_bad_kv_dtype_is_a_config_error():
    with pytest.raises(qj.ConfigError, match="kv_dtype must be one of model, int8"):
        qj.load(progress=False, kv_dtype="fp8")


def test_a_cache_that_does_not_fit_says_what_does():
    """At the 30B-A3B shape, 98 KB a token in bfloat16 (50 KB in int8): 8 rows of 262,144 tokens need 206 GB; with
    80 GB free after the weights, the error gives the longest cache that fits, and the int8 one."""
    config = qj.preset("qwen3-coder-30b-a3b")
    assert bytes_per_token(config, jnp.bfloat16) == 98304 and bytes_per_token(config, jnp.bfloat16, "int8") == 49920
    check_cache_fits(config, 8, 65536, jnp.bfloat16, "model", 80e9)  # 51.5 GB: fits
    with pytest.raises(qj.ContextLengthError, match=r"8 rows x 262144 tokens \(bfloat16, 98.3 KB a token\) needs "
                                                    r"206.2 GB.* at most 91392 tokens per row fit at 8 rows "
                                                    r"\(180224 with kv_dtype int8\)"):
        check_cache_fits(config, 8, 262144, jnp.bfloat16, "model", 80e9)


def test_max_seq_len_is_checked(caplog):
    with pytest.raises(qj.ConfigError, match="max_seq_len must be a positive integer"):
        qj.random_model("tiny", max_seq_len=0)
    with caplog.at_level("WARNING"):
        qj.random_model("tiny", max_seq_len=2048)  # tiny has 1,024 positions
    assert "past the 1024 positions this model was trained for" in caplog.text
