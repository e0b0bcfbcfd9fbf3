"""Speculative decoding: tokens drafted cheaply on the host, checked by the target model in one step.

A decode step at small batch reads every weight once for one token per row; a step over K+1 positions of a row
costs little more. `verify_block` feeds each row its next token and its drafted tokens d1..dK at once and samples
the target's own token at every one of those K+1 positions, exactly as K+1 decode steps would (same penalty
window, same filters, the same draw keyed by (seed, position)), taking each drafted token as the context of the
next position. A row keeps its samples up to and including the first that differs from the draft: the longest
agreeing run plus one token of the target's own. So a greedy row's tokens are those of plain decoding, and a
sampled row's too, draw for draw.

That is the rejection rule of speculative sampling for a draft that is one token (a point mass, as an n-gram
lookup's): the drafted token t is kept with probability p(t), the target's probability of drawing it, and when it
is not, the token is drawn from p with t taken out and renormalised. Drawing s ~ p and keeping t iff s == t does
both at once (P(s == t) = p(t); given s != t, s is distributed as p without t), with the very draw plain decoding
makes, which is what keeps a seeded run reproducible and equal to the same run without speculation.

KV-cache slots and history entries written past what a row kept need no undoing: attention and the repetition
penalty read a row's slots only up to the position being computed, and every later step writes its position
before it reads it. The row's next_token is the last token kept.

Drafters run between steps: `NgramDrafter` (prompt lookup, on the host) or a draft model (draft_model.py:
`ModelDrafter`, greedy, on a KV cache of its own). A row whose drafts keep failing drafts less and then pauses
(`DraftBudget`). Constrained rows never draft (their mask depends on each token taken).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params
from qwen3moe_jax.model.sharding import constrain
from qwen3moe_jax.model.transformer import attention_window, forward, lm_logits
from qwen3moe_jax.runtime.constraints import ALL_ALLOWED
from qwen3moe_jax.runtime.engine import (
    Engine,
    Slots,
    StepTokens,
    _sample_step,
    bucket_length,
    step_program,
)
from qwen3moe_jax.runtime.sampling import SamplerState

METHODS = ("ngram", "draft_model")  # prompt lookup; a draft model (load's draft_model, serve's --draft-model)
# Measured on the bundled model, 2 CPU cores (README, "Speculative decoding"): see scripts/bench_speculative.py.
DEFAULT_DRAFT_TOKENS = 7
DEFAULT_NGRAM = 3
# What a verify step of DEFAULT_DRAFT_TOKENS costs against a decode block of the default decode_steps: 3.1 against
# 3.8 ms on the bundled model, 2 CPU cores (an MoE's verify reads each position's experts, so it is not free).
VERIFY_COST = 0.8
# A token the verify step did not keep (past a row's first disagreement): the host delivers up to it.
UNKEPT = -2


@step_program("config", "window")
def verify_block(
    params: Params, slots: Slots, sampler: SamplerState, positions: jax.Array, active: jax.Array,
    drafts: jax.Array, draft_len: jax.Array, logprobs: jax.Array, allowed: jax.Array, forced: jax.Array,
    config: ModelConfig, window: int,
) -> tuple[StepTokens, Slots]:
    """Row b feeds its next_token at positions[b] and drafts[b, :draft_len[b]] after it ([B, K] int32, padded)
    in one forward pass, and samples its own token after each (the first under `allowed` / `forced`, as in
    decode_block). Returns StepTokens [K+1, B] whose tokens past a row's kept run are UNKEPT, and the state with
    next_token the last kept token. Rows not `active` are parked at the cache length: left as they were."""
    S = slots.history.shape[1]
    B, K = drafts.shape
    rows = jnp.arange(B)
    tokens = jnp.concatenate([slots.next_token[:, None], drafts], axis=1)  # [B, K+1]
    start = jnp.where(active, positions, S)
    history = slots.history.at[rows[:, None], start[:, None] + jnp.arange(K + 1)].set(tokens, mode="drop")
    hidden, cache, _ = forward(params, tokens, start, slots.cache, config, window)
    # The K+1 positions of a row sampled as K+1 rows of one sampler call (one call costs far less than K+1 on
    # CPU): position start + j has the row's settings and key, and its penalty window ends at the token fed there.
    per_position = lambda a: jnp.repeat(a, K + 1, axis=0)  # noqa: E731
    first = jnp.tile(jnp.arange(K + 1) == 0, B)
    logits = constrain(lm_logits(params, hidden.reshape(B * (K + 1), -1)), (None, None))
    out = _sample_step(logits, jax.tree.map(per_position, sampler), per_position(history),
                       (start[:, None] + jnp.arange(1, K + 2)).reshape(-1), logprobs,
                       jnp.where(first[:, None], per_position(allowed), ALL_ALLOWED),
                       jnp.where(first, per_position(forced), -1))
    out = StepTokens(*(a.reshape(B, K + 1, *a.shape[1:]).swapaxes(0, 1) for a in out))  # [K+1, B, ...]
    agree = (out.token[:K] == drafts.T) & (jnp.arange(K)[:, None] < draft_len[None, :])  # [K, B]
    accepted = jnp.sum(jnp.cumprod(agree, axis=0), axis=0)  # the agreeing run's length per row
    kept = jnp.arange(K + 1)[:, None] <= accepted[None, :]
    last = out.token[accepted, rows]
    next_token = jnp.where(active, jnp.maximum(last, 0), slots.next_token)
    token = constrain(jnp.where(kept, out.token, UNKEPT), (None, None))
    return out._replace(token=token), Slots(cache, history, next_token)


class SpeculativeEngine(Engine):
    """An Engine that also runs `verify` steps of `draft_tokens` drafted tokens per row."""

    STEPS = Engine.STEPS + ("verify",)

    def __init__(self, *args: Any, draft_tokens: int = DEFAULT_DRAFT_TOKENS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.draft_tokens = draft_tokens

    def verify(self, positions: Sequence[int], active: Sequence[bool], drafts: Sequence[Sequence[int]],
               logprobs: bool = False, allowed: Sequence[Sequence[int] | None] | None = None,
               forced: Sequence[int] | None = None, window: int | None = None) -> StepTokens:
        """One verify step of every row from `positions` with its `drafts` (at most draft_tokens each; an empty
        one: the row makes one token, as a decode step); allowed / forced as for `decode`'s first step. The
        attention window is the one the furthest position needs, unless given."""
        # The step's width is a power of two (at most draft_tokens + 1) holding the longest draft: short drafts
        # cost a short step (each position's experts are read), and each width compiles once per window.
        B = self.batch_size
        K = bucket_length(max(map(len, drafts)) + 1, self.draft_tokens + 1, minimum=2) - 1
        positions = np.asarray(positions, np.int32)
        active = np.asarray(active, bool)
        padded = np.zeros((B, K), np.int32)
        lengths = np.zeros(B, np.int32)
        for b, draft in enumerate(drafts):
            lengths[b] = len(draft)
            padded[b, : len(draft)] = draft
        if window is None:
            top = int((positions + lengths)[active].max()) if active.any() else 0
            window = attention_window(top + 1, self.max_seq_len)
        host = [positions, active, padded, lengths, np.bool_(logprobs)]
        host.append(self.token_mask(allowed) if allowed is not None else None)
        host.append(np.asarray(forced, np.int32) if forced is not None else None)
        args = self._put([a for a in host if a is not None])
        mask = args[5] if allowed is not None else self._constant("mask", B)
        tokens = args[-1] if forced is not None else self._constant("forced", B)
        return self._run(verify_block, self.params, self._take_state(), self.sampler(), *args[:5], mask, tokens,
                         self.config, window)

    def warmup_programs(self, prompt_len: int, max_new_tokens: int | None = None,
                        all_buckets: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """Engine.warmup_programs, and the verify step of each width at each decode window."""
        programs = super().warmup_programs(prompt_len, max_new_tokens, all_buckets)
        B = self.batch_size
        windows = [kwargs["window"] for _, op, kwargs in programs if op == "decode"]
        width = 2
        while True:
            K = min(width, self.draft_tokens + 1) - 1
            programs += [(f"verify {K} drafted (window {w})", "verify",
                          dict(positions=[0] * B, active=[False] * B, drafts=[[0] * K] * B, window=w)) for w in windows]
            if K == self.draft_tokens:
                return programs
            width *= 2


class Drafter(Protocol):
    """What drafts for the Speculator: NgramDrafter, draft_model.ModelDrafter."""

    def draft(self, requests: Sequence[Any], ks: Sequence[int]) -> list[list[int]]:
        """Row b's draft of at most ks[b] tokens (requests[b] is the request in row b; [] where ks[b] is 0)."""
        ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens
    (n = ngram, then shorter, down to MIN_NGRAM), as code edits and quotes repeat their input. One token is too
    weak a cue: measured on the bundled model, its drafts were mostly refused."""

    MIN_NGRAM = 2

    def __init__(self, ngram: int = DEFAULT_NGRAM):
        if ngram < 1:
            raise ConfigError(f"the n-gram size must be at least 1, got {ngram}")
        self.ngram = ngram

    def draft(self, requests: Sequence[Any], ks: Sequence[int]) -> list[list[int]]:
        return [self.propose(np.asarray(r.prompt + r.output, np.int32), k) if k else [] for r, k in zip(
            requests, ks, strict=True)]

    def propose(self, context: np.ndarray, k: int) -> list[int]:
        n_ctx = len(context)
        for n in range(min(self.ngram, n_ctx - 1), min(self.MIN_NGRAM, self.ngram) - 1, -1):
            tail = context[n_ctx - n:]
            # Candidate starts whose n-gram ends before the tail: each has at least one token after it.
            starts = np.flatnonzero(context[: n_ctx - n] == tail[0])
            for i in starts[::-1]:
                if np.array_equal(context[i: i + n], tail):
                    return context[i + n: i + n + k].tolist()
        return []


@dataclasses.dataclass
class DraftBudget:
    """What a row's drafts are worth, from how they fared: `acceptance`, an estimate of the chance that a drafted
    token is kept (a running mean of each verify's kept run against where it broke off), gives the tokens a draft
    of d is expected to bring, 1 + a + a^2 + ... + a^d. A row whose drafts are kept drafts on; one whose drafts
    bring too little is left to plain decoding (the scheduler's choice); after MISSES_TO_PAUSE verify steps in a
    row that kept none of its draft, it stops drafting for `pause` decode calls, a pause that doubles each time
    (up to MAX_PAUSE) until a draft is kept again, and then starts again from the first estimate."""

    acceptance: float = 0.8
    misses: int = 0
    paused: int = 0  # decode calls left without drafting
    pause: int = 4

    FIRST_ACCEPTANCE = 0.8
    MEMORY = 0.7  # the weight of the past in the running mean
    RECOVERY = 0.1
    MISSES_TO_PAUSE = 1
    MAX_PAUSE = 64

    def drafting(self) -> bool:
        """Whether the row drafts at this decode call (a paused call counts towards the pause)."""
        if self.paused:
            self.paused -= 1
            return False
        return True

    def skipped(self) -> None:
        """The row's draft was not verified (it was not worth a step): the estimate drifts back to the first one,
        so that a row is tried again after a while rather than never."""
        self.acceptance += self.RECOVERY * (self.FIRST_ACCEPTANCE - self.acceptance)

    def expected_tokens(self, drafted: int) -> float:
        """The tokens a verify step is expected to bring the row with a draft of `drafted` tokens."""
        return sum(self.acceptance ** i for i in range(drafted + 1))

    def record(self, drafted: int, accepted: int) -> None:
        rate = 1.0 if accepted == drafted else accepted / (accepted + 1)
        self.acceptance = self.MEMORY * self.acceptance + (1 - self.MEMORY) * rate
        if accepted:
            self.misses, self.pause = 0, 4
            return
        self.misses += 1
        if self.misses >= self.MISSES_TO_PAUSE:
            self.misses, self.paused, self.pause = 0, self.pause, min(2 * self.pause, self.MAX_PAUSE)
            self.acceptance = self.FIRST_ACCEPTANCE


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings: the method (one of METHODS), the most tokens drafted per step, the n-gram
    size (for "ngram")."""

    method: str = "ngram"
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ngram: int = DEFAULT_NGRAM

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        if not isinstance(self.ngram, int) or self.ngram < 1:
            raise ConfigError(f"ngram must be an integer >= 1, got {self.ngram!r}")


class Speculator:
    """The scheduler's side of speculation: each row's draft for the next step (from `drafter`; None: prompt
    lookup) and its DraftBudget, and the counts of tokens drafted and accepted (the server's metrics)."""

    def __init__(self, config: SpeculativeConfig, drafter: Drafter | None = None):
        self.config = config
        self.drafter = drafter or NgramDrafter(config.ngram)
        self._budgets: weakref.WeakKeyDictionary[Any, DraftBudget] = weakref.WeakKeyDictionary()
        self.drafted_tokens = 0
        self.accepted_tokens = 0

    def budget(self, request: Any) -> DraftBudget:
        if request not in self._budgets:
            self._budgets[request] = DraftBudget()
        return self._budgets[request]

    def drafts(self, requests: Sequence[Any], rooms: Sequence[int], decode_steps: int) -> list[list[int]] | None:
        """Each request's draft for a verify step (at most its room tokens; [] for None and rows that do not
        draft now), or None when a decode block of decode_steps tokens a row is expected to bring more tokens than
        the verify step (which brings a row without a draft one token): then no row speculates at this call. Nothing
        is drafted when even drafts of the full length would not pay (a draft model's step saved)."""
        ks = [min(room, self.config.draft_tokens) if request is not None else 0
              for request, room in zip(requests, rooms, strict=True)]
        ks = [k if k > 0 and self.budget(request).drafting() else 0 for request, k in zip(requests, ks, strict=True)]
        drafts = [[0] * k for k in ks]  # as long as can be, first
        if any(ks) and self._gain(requests, drafts, decode_steps) > 0:
            drafts = self.drafter.draft(requests, ks)
            if any(drafts) and self._gain(requests, drafts, decode_steps) > 0:
                return drafts
        for request, draft in zip(requests, drafts, strict=True):
            if draft:
                self.budget(request).skipped()
        return None

    def _gain(self, requests: Sequence[Any], drafts: Sequence[list[int]], decode_steps: int) -> float:
        """The tokens a verify step with these drafts is expected to bring beyond a decode block, at its cost."""
        return sum(self.budget(r).expected_tokens(len(d)) - VERIFY_COST * decode_steps
                   for r, d in zip(requests, drafts, strict=True) if r is not None)

    def record(self, request: Any, drafted: int, accepted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.budget(request).record(drafted, accepted)
