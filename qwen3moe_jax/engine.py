"""jit-compiled prefill and decode steps over a preallocated, donated KV cache, and the step loop over them.

- `prefill_step` runs a whole prompt padded to a length bucket (a power of two), so a new prompt length
  compiles only when it lands in a new bucket.
- `decode_step` runs one token per row at per-row positions; its shapes never change with the position,
  so it compiles once per attention window: it reads only the first `window` cache slots (a power of two
  >= the filled length, at least MIN_WINDOW), so early tokens of a long cache do not pay for all of it.
Both take the cache with `donate_argnames`, so XLA writes the new keys and values into the same buffer.
The request-level loop (stop checks, text, callbacks) is in generation.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.cache import KVCache
from qwen3moe_jax.config import ModelConfig
from qwen3moe_jax.errors import ContextLengthError, Qwen3MoeError, SamplingError
from qwen3moe_jax.model import Params, forward, lm_logits
from qwen3moe_jax.sampling import SamplerState, SamplingParams, sample
from qwen3moe_jax.sharding import constrain, replicate, use_mesh

MIN_BUCKET = 16
# Decode attention spans start here: below it, reading the whole span costs less than another compile.
MIN_WINDOW = 256


def bucket_length(n: int, max_len: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at max_len."""
    return min(max(minimum, 1 << (n - 1).bit_length()), max_len)


def attention_window(filled: int, max_len: int) -> int:
    """The cache slots a decode step reads when `filled` slots (the new token's included) hold keys."""
    return bucket_length(filled, max_len, MIN_WINDOW)


@partial(jax.jit, static_argnames="config", donate_argnames=("cache", "history"))
def prefill_step(
    params: Params, tokens: jax.Array, lengths: jax.Array, cache: KVCache, history: jax.Array,
    sampler: SamplerState, config: ModelConfig,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """Fill cache slots 0..T-1 from right-padded prompts tokens [B, T] (history [B, S] already holds them).

    Returns the sampled next token [B] (-1 where the logits hold NaN), the logits [B, V] at each row's
    last prompt token, the cache and the history.
    """
    start = jnp.zeros(tokens.shape[0], jnp.int32)
    # The prompt fills slots 0..T-1, so attention never needs to read past them.
    hidden, cache, _ = forward(params, tokens, start, cache, config, window=tokens.shape[1])
    logits = constrain(lm_logits(params, hidden[jnp.arange(tokens.shape[0]), lengths - 1]), (None, None))
    return _checked_sample(logits, sampler, history, lengths), logits, cache, history


@partial(jax.jit, static_argnames=("config", "window"), donate_argnames=("cache", "history"))
def decode_step(
    params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, history: jax.Array,
    sampler: SamplerState, config: ModelConfig, window: int | None = None,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """One token per row, tokens [B] at positions [B] (all below `window`, default the cache length):
    records them in the history, runs the model and samples the next token.
    Returns (next token [B], logits [B, V], cache, history)."""
    history = history.at[jnp.arange(tokens.shape[0]), positions].set(tokens)
    hidden, cache, _ = forward(params, tokens[:, None], positions, cache, config, window)
    logits = constrain(lm_logits(params, hidden[:, 0]), (None, None))
    return _checked_sample(logits, sampler, history, positions + 1), logits, cache, history


def _checked_sample(logits: jax.Array, sampler: SamplerState, history: jax.Array, length: jax.Array) -> jax.Array:
    # NaN logits cannot raise inside jit: mark the row with -1 and let the host loop raise.
    token = jnp.where(jnp.isnan(logits).any(-1), -1, sample(logits, sampler, history, length))
    # On a mesh, every device (and so every process) holds the whole result: the host reads it.
    return constrain(token, (None,))


@partial(jax.jit, static_argnames="config")
def full_logits(params: Params, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits at every position of tokens [B, T] in one pass, with a scratch cache of length T."""
    B, T = tokens.shape
    cache = KVCache.init(config, B, T, params.embed.dtype)
    hidden, _, _ = forward(params, tokens, jnp.zeros(B, jnp.int32), cache, config)
    return constrain(lm_logits(params, hidden), (None, None, None))


class Engine:
    """Owns the params and one KV cache buffer, and runs requests through the jit steps.

    The cache is allocated once (lazily) and handed from step to step by donation; requests reuse it.
    """

    def __init__(self, params: Params, config: ModelConfig, max_seq_len: int, batch_size: int = 1, mesh: Any = None):
        self.params = params
        self.config = config
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.mesh = mesh  # a jax.sharding.Mesh the params are sharded over (sharding.py), or None
        # Process 0 of a multi-process server: each request's steps are announced to the others (multihost.py).
        self.leading = False
        self._cache: KVCache | None = None

    @property
    def dtype(self) -> Any:
        return self.params.embed.dtype

    def _take_cache(self) -> KVCache:
        # Taken out while a request runs: if a step fails after donating the buffer, the next request
        # allocates a fresh one rather than touching a deleted array.
        cache, self._cache = self._cache, None
        return cache if cache is not None else KVCache.init(
            self.config, self.batch_size, self.max_seq_len, self.dtype, self.mesh
        )

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache, history: np.ndarray,
                sampler: SamplerState) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
        """prefill_step on this engine's params (and mesh: host inputs replicated over it)."""
        tokens, lengths, history = replicate((tokens, lengths, history), self.mesh)
        with use_mesh(self.mesh):
            return prefill_step(self.params, tokens, lengths, cache, history, sampler, self.config)

    def decode(self, tokens: jax.Array, positions: np.ndarray, cache: KVCache, history: jax.Array,
               sampler: SamplerState) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
        """decode_step at `positions`, reading the attention window their longest row needs."""
        window = attention_window(int(np.max(positions)) + 1, self.max_seq_len)
        positions = replicate(positions, self.mesh)
        with use_mesh(self.mesh):
            return decode_step(self.params, tokens, positions, cache, history, sampler, self.config, window)

    def check_request(self, prompt_len: int, max_new_tokens: int | None) -> None:
        """KV-3: refuse up front a request the cache cannot hold (max_new_tokens None: fill the cache)."""
        if prompt_len < 1:
            raise Qwen3MoeError("the prompt is empty: give at least one token")
        wanted = 1 if max_new_tokens is None else max_new_tokens
        if prompt_len + wanted > self.max_seq_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({wanted}) = {prompt_len + wanted} exceeds "
                f"the KV cache length {self.max_seq_len}; shorten the prompt, lower max_new_tokens, or load "
                "with a larger max_seq_len"
            )

    def check_tokens(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise Qwen3MoeError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.config.vocab_size - 1}")

    def tokens(self, prompt: Sequence[int], sampling: SamplingParams, limit: int) -> Iterator[tuple[int, jax.Array]]:
        """Yield (token id, the logits [B, V] it was drawn from, on device) for up to `limit` new tokens
        (see local_tokens; when leading a multi-process server, the other processes take the same steps)."""
        if self.leading:
            from qwen3moe_jax.multihost import lead

            return lead(self, prompt, sampling, limit)
        return self.local_tokens(prompt, sampling, limit)

    def local_tokens(
        self, prompt: Sequence[int], sampling: SamplingParams, limit: int
    ) -> Iterator[tuple[int, jax.Array]]:
        """Yield (token id, the logits [B, V] it was drawn from, on device) for up to `limit` new tokens.

        The caller checks the request first (check_tokens, check_request) and decides when to stop:
        closing this generator ends the request and gives the cache back. Each step is dispatched before
        the previous token is handed out, so the device computes token i+1 while the host handles token i
        (JAX dispatch is asynchronous); when the caller stops, that one step in flight is dropped.
        """
        cache = self._take_cache()
        try:
            n = len(prompt)
            padded = np.zeros((self.batch_size, bucket_length(n, self.max_seq_len)), np.int32)
            padded[:, :n] = prompt
            history = np.zeros((self.batch_size, self.max_seq_len), np.int32)
            history[:, :n] = prompt
            sampler = replicate(SamplerState.from_params([sampling] * self.batch_size), self.mesh)
            lengths = np.full((self.batch_size,), n, np.int32)
            token, logits, cache, history = self.prefill(padded, lengths, cache, history, sampler)
            for step in range(limit):
                token_id, token_logits = int(token[0]), logits  # the one host transfer per step
                if token_id < 0:
                    raise SamplingError("the model produced NaN logits; the weights or inputs are broken")
                if step < limit - 1:
                    positions = np.full((self.batch_size,), n + step, np.int32)
                    token, logits, cache, history = self.decode(token, positions, cache, history, sampler)
                yield token_id, token_logits
        finally:
            if not any(a.is_deleted() for a in cache.k):
                self._cache = cache

    def warmup(self, prompt_len: int, max_new_tokens: int | None = None) -> None:
        """Compile prefill for prompt_len's bucket and decode for every attention window that a request of
        prompt_len + max_new_tokens tokens (None: up to the cache length) can reach, by running each once
        on dummy tokens."""
        for _ in self.tokens([0] * prompt_len, SamplingParams(), limit=1):
            pass
        end = self.max_seq_len if max_new_tokens is None else min(prompt_len + max_new_tokens, self.max_seq_len)
        windows = [attention_window(prompt_len + 1, self.max_seq_len)]
        while windows[-1] < attention_window(end, self.max_seq_len):
            windows.append(attention_window(windows[-1] + 1, self.max_seq_len))
        cache = self._take_cache()
        history, tokens, sampler = replicate((
            np.zeros((self.batch_size, self.max_seq_len), np.int32), np.zeros(self.batch_size, np.int32),
            SamplerState.from_params([SamplingParams()] * self.batch_size),
        ), self.mesh)
        for window in windows:  # position window - 1 makes decode read exactly that window
            positions = np.full((self.batch_size,), window - 1, np.int32)
            _, _, cache, history = self.decode(tokens, positions, cache, history, sampler)
        self._cache = cache
