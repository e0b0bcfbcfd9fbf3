"""Sampling: parameters validated on construction, and the sampler as pure JAX functions that run
inside the jit-compiled steps (CONTRACTS.md, Sampling)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.errors import SamplingError
from qwen3moe_jax.runtime.constraints import canonical_schema


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. The defaults are greedy decoding of up to 32 tokens.

    Applied per step in this order: repetition penalty over the last `repeat_last_n` tokens,
    temperature, top_k (0 = off), top_p (1.0 = off), then a draw seeded by `seed`.
    temperature == 0 or top_k == 1 is greedy argmax.

    Generation ends at `max_new_tokens` (None: when the KV cache is full), at a token of
    `stop_token_ids` (None: the model's EOS ids), or at one of the `stop` strings, which the returned
    text leaves out; max_new_tokens=0 generates nothing (a request that only scores its prompt). `logprobs` = n
    asks for the chosen token's log-probability and the n most likely alternatives at each step (None: off);
    `prompt_logprobs` = n the same for every prompt token but the first, each given the tokens before it.

    At most one of `json_schema` (a dict or JSON text, kept as JSON text), `regex` or `grammar` (a Lark
    grammar in llguidance's syntax, which embeds JSON schemas as `%json{...}`) constrains the output to
    match it (constraints.py); generation then also ends where the structure is complete.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    max_new_tokens: int | None = 32
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repeat_penalty) or not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise SamplingError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty!r}")
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < 0:
            raise SamplingError(f"repeat_last_n must be an integer >= 0, got {self.repeat_last_n!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise SamplingError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            raise SamplingError(f"max_new_tokens must be an integer >= 0 or None, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):  # a lone string is one stop string, not a set of characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
            if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise SamplingError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise SamplingError(f"{name} must be an integer >= 0 or None, got {value!r}")
        given = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) > 1:
            raise SamplingError(f"give at most one of json_schema, regex and grammar, got {' and '.join(given)}")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", canonical_schema(self.json_schema))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


# The sampler: pure functions on [B, V] logits, jit-compiled into the decode step. Every parameter is a
# traced per-row array, so changing them between requests never recompiles.

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """Per-row sampling parameters as device arrays, plus the request's base rng key."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    repeat_penalty: jax.Array  # [B] float32
    repeat_last_n: jax.Array  # [B] int32
    key: jax.Array  # [B] rng keys

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> SamplerState:
        def column(name: str, dtype: Any) -> jax.Array:
            values = [getattr(p, name) for p in params]
            if jnp.issubdtype(dtype, jnp.integer):  # past int32, top_k and repeat_last_n mean "all": the same
                values = [min(v, jnp.iinfo(dtype).max) for v in values]
            return jnp.asarray(values, dtype)

        return cls(
            temperature=column("temperature", jnp.float32), top_k=column("top_k", jnp.int32),
            top_p=column("top_p", jnp.float32), repeat_penalty=column("repeat_penalty", jnp.float32),
            repeat_last_n=column("repeat_last_n", jnp.int32),
            key=jax.vmap(jax.random.key)(column("seed", jnp.uint32)),
        )


def penalize_repeats(logits: jax.Array, history: jax.Array, length: jax.Array, penalty: jax.Array,
                     window: jax.Array) -> jax.Array:
    """REP: every distinct token among history[b, length-window : length] has its logit divided by the
    penalty when positive and multiplied by it when not. history [B, S] holds prompt + generated ids;
    penalty 1 or window 0 return the logits bit for bit."""
    B, V = logits.shape
    slots = jnp.arange(history.shape[1])
    in_window = (slots >= length[:, None] - window[:, None]) & (slots < length[:, None])
    ids = jnp.where(in_window, history, V)  # V is out of range: dropped by the scatter below
    seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")
    p = penalty[:, None].astype(logits.dtype)
    return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (0 = off; ties with the k-th value are kept), then top-p: the smallest
    set of most likely tokens whose mass reaches p (1.0 = off, exactly). Dropped tokens get -inf.

    Both cut-offs are found by a binary search over the values instead of a sort of the vocabulary:
    exact, and ~25x faster on CPU at Qwen's 151,936 tokens (scripts/bench_sampling.py). Each is skipped
    at run time when no row asks for it.
    """
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    V = logits.shape[-1]

    def apply_top_k(x: jax.Array) -> jax.Array:
        kth = _largest_cutoff(x, jnp.ones_like(x), jnp.minimum(top_k, V).astype(jnp.float32))
        return jnp.where((top_k[:, None] > 0) & (x < kth[:, None]), -jnp.inf, x)

    def apply_top_p(x: jax.Array) -> jax.Array:
        cutoff = _largest_cutoff(x, jax.nn.softmax(x, axis=-1), top_p)
        return jnp.where((top_p[:, None] < 1.0) & (x < cutoff[:, None]), -jnp.inf, x)

    logits = jax.lax.cond(jnp.any(top_k > 0), apply_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(top_p < 1.0), apply_top_p, lambda x: x, logits)


def _largest_cutoff(x: jax.Array, weight: jax.Array, target: jax.Array) -> jax.Array:
    """Per row of x [B, V], the largest value c among the row's values such that the weight of
    {x >= c} is at least target[b]: the k-th largest value for unit weights and target k, the top-p
    threshold for probabilities and target p (ties with c are kept either way).

    A binary search over the 32-bit pattern of c, mapped to unsigned ints that sort as the floats do,
    so 32 halvings land exactly on a value of the row.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))

    def halve(_, bounds):  # invariant: the answer is in [lo, hi] and weight(keys >= lo) >= target
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)  # the upper middle, computed without overflow
        enough = jnp.sum(jnp.where(keys >= mid[:, None], weight, 0), axis=-1) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    B = x.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros(B, jnp.uint32), jnp.full(B, 2**32 - 1, jnp.uint32)),
                              unroll=True)
    bits = jnp.where(lo >> 31 == 1, lo & jnp.uint32(2**31 - 1), ~lo)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def unpack_mask(words: jax.Array, vocab_size: int) -> jax.Array:
    """A token bitmask [B, W] int32 (bit t % 32 of word t // 32, constraints.py) as [B, vocab_size] bool."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].astype(bool)


def sample(logits: jax.Array, state: SamplerState, history: jax.Array, length: jax.Array,
           allowed: jax.Array | None = None) -> jax.Array:
    """The next token per row [B]: penalty, temperature, top-k, top-p, then a draw keyed by (seed, length),
    so a request's draws depend only on its seed and position. Greedy rows take the argmax, and when
    every row is greedy the filtering and the draw are skipped at run time.

    allowed [B, V] bool: the tokens a row's constraint allows next (all True or None: unconstrained). A row
    takes the most likely allowed token (greedy), or draws among the allowed tokens the filters keep, with the
    Gumbel noise of the unconstrained draw; when the filters keep none of them, the most likely allowed token.
    So the draw under any set of allowed tokens that holds it is the same draw."""
    logits = penalize_repeats(logits, history, length, state.repeat_penalty, state.repeat_last_n)
    if allowed is None:
        allowed = jnp.ones(logits.shape, bool)
    greedy_rows = (state.temperature == 0) | (state.top_k == 1)
    greedy = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(jnp.int32)

    def draw(logits: jax.Array) -> jax.Array:
        kept = jnp.where(allowed, filter_logits(logits, state.temperature, state.top_k, state.top_p), -jnp.inf)
        keys = jax.vmap(jax.random.fold_in)(state.key, length)
        drawn = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
        none_kept = jnp.all(kept == -jnp.inf, axis=-1)
        return jnp.where(greedy_rows | none_kept, greedy, drawn)

    return jax.lax.cond(jnp.all(greedy_rows), lambda _: greedy, draw, logits)


@partial(jax.jit, static_argnames="n")
def token_logprobs(logits: jax.Array, token: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the model's own distribution (before penalty, temperature and filters) of
    `token` [B] and of the n most likely tokens: (chosen [B], top ids [B, n], top logprobs [B, n])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, n)
    return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids, top_logp
