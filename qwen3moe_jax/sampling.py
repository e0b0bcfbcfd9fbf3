"""Sampling: parameters validated on construction, and the sampler as pure JAX functions that run
inside the jit-compiled steps (CONTRACTS.md, Sampling)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qwen3moe_jax.errors import SamplingError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding.

    Applied per step in this order: repetition penalty over the last `repeat_last_n` tokens,
    temperature, top_k (0 = off), top_p (1.0 = off), then a draw seeded by `seed`.
    temperature == 0 or top_k == 1 is greedy argmax.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise SamplingError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise SamplingError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise SamplingError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


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
            return jnp.asarray([getattr(p, name) for p in params], dtype)

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
    set of most likely tokens whose mass reaches p (1.0 = off, exactly). Dropped tokens get -inf."""
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    descending = -jnp.sort(-logits, axis=-1)
    V = logits.shape[-1]
    kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
    logits = jnp.where((top_k[:, None] > 0) & (logits < kth), -jnp.inf, logits)

    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1: the first token has mass_before 0
    threshold = jnp.take_along_axis(descending, (kept - 1)[:, None], axis=-1)
    return jnp.where((top_p[:, None] < 1.0) & (logits < threshold), -jnp.inf, logits)


def sample(logits: jax.Array, state: SamplerState, history: jax.Array, length: jax.Array) -> jax.Array:
    """The next token per row [B]: penalty, temperature, top-k, top-p, then a draw keyed by (seed, length),
    so a request's draws depend only on its seed and position. Greedy rows take the argmax."""
    logits = penalize_repeats(logits, history, length, state.repeat_penalty, state.repeat_last_n)
    greedy = jnp.argmax(logits, axis=-1)
    filtered = filter_logits(logits, state.temperature, state.top_k, state.top_p)
    keys = jax.vmap(jax.random.fold_in)(state.key, length)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where((state.temperature == 0) | (state.top_k == 1), greedy, drawn).astype(jnp.int32)
