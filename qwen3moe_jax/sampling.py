"""Sampling parameters, validated on construction."""

from __future__ import annotations

import dataclasses
import math

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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
