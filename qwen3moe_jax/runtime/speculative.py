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
before it reads it. The row's next_token is the last token kept. After the verify round, the same device call
mostly runs decode_steps - 1 plain decode steps of every row from its last kept token (`tail`; engine.decode_block's
steps), so that a refused draft, or a row without one, still makes a decode block's tokens: a draft that fails costs
only its extra positions, not a device call.

Drafters run between steps: `NgramDrafter` (prompt lookup, on the host) or a draft model (draft_model.py:
`ModelDrafter`, greedy, on a KV cache of its own). A row's draft length climbs a ladder while its drafts are kept
whole, and a row whose draft is refused pauses briefly (`DraftBudget`). Constrained rows never draft (their mask
depends on each token taken).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence
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
    decode_block,
    step_program,
)
from qwen3moe_jax.runtime.sampling import SamplerState

METHODS = ("ngram", "draft_model")  # prompt lookup; a draft model (load's draft_model, serve's --draft-model)
# Measured on the bundled model, 2 CPU cores (README, "Speculative decoding"): see scripts/bench_speculative.py.
# The most tokens drafted per step, per method: prompt lookup climbs to it only while its drafts are kept whole
# (DraftBudget); a draft model drafts this many in each draft step.
DEFAULT_DRAFT_TOKENS = {"ngram": 31, "draft_model": 7}
DEFAULT_NGRAM = 4  # the n-gram prompt lookup matches (NgramDrafter)
# A token the verify step did not keep (past a row's first disagreement): the host delivers up to it.
UNKEPT = -2


@step_program("config", "window", "tail")
def verify_block(
    params: Params, slots: Slots, sampler: SamplerState, positions: jax.Array, active: jax.Array,
    drafts: jax.Array, draft_len: jax.Array, logprobs: jax.Array, allowed: jax.Array, forced: jax.Array,
    config: ModelConfig, window: int, tail: int = 0,
) -> tuple[StepTokens, Slots]:
    """Row b feeds its next_token at positions[b] and drafts[b, :draft_len[b]] after it ([B, K] int32, padded)
    in one forward pass, and samples its own token after each (the first under `allowed` / `forced`, as in
    decode_block); then `tail` decode steps of every row from its last kept token (unconstrained). Returns StepTokens
    [K+1+tail, B] whose tokens past a row's kept run in the first K+1 are UNKEPT, and the state with next_token the
    last token made. Rows not `active` are parked at the cache length: left as they were."""
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
    out, slots = out._replace(token=token), Slots(cache, history, next_token)
    if tail:
        more, slots, _ = decode_block(params, slots, sampler, positions + accepted + 1, active, logprobs,
                                      jnp.full_like(allowed, ALL_ALLOWED), jnp.full_like(forced, -1),
                                      config=config, window=window, steps=tail)
        out = StepTokens(*(jnp.concatenate([a, b]) for a, b in zip(out, more, strict=True)))
    return out, slots


# The widths (positions per row) a verify step compiles for, each capped at draft_tokens + 1. Measured on the bundled
# model, 2 CPU cores, against a 4-step decode block: a verify step of width 2, 4, 8 or 32 with its 3 decode steps
# cost 1.0x, 1.15x, 1.6x and 2.3x; one of 16 cost as much as 32 (the MoE's blocked kernel from 32 (token, expert)
# pairs on), so it is left out. Fewer widths also mean fewer compiles.
VERIFY_WIDTHS = (2, 4, 8, 32, 128)
# From this width on, a verify step where every row drafts runs no decode steps after it (SpeculativeEngine.tail): at
# 32 positions, 32 tokens in 1.6x a decode block's time, against 35 in 2.4x with them (bundled model, 2 CPU cores).
HOT_WIDTH = 32


def verify_widths(draft_tokens: int) -> list[int]:
    """The verify widths of a SpeculativeEngine of draft_tokens: VERIFY_WIDTHS up to draft_tokens + 1, and that."""
    return sorted({min(w, draft_tokens + 1) for w in VERIFY_WIDTHS} | {draft_tokens + 1})


class SpeculativeEngine(Engine):
    """An Engine that also runs `verify` steps of up to `draft_tokens` drafted tokens per row."""

    STEPS = Engine.STEPS + ("verify",)

    def __init__(self, *args: Any, draft_tokens: int = DEFAULT_DRAFT_TOKENS["ngram"],
                 draft_engine: Engine | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.draft_tokens = draft_tokens
        self.widths = verify_widths(draft_tokens)
        self.draft_engine = draft_engine  # a draft model's (draft_model.DraftEngine): warmed up with this one

    def width(self, drafts: Sequence[Sequence[int]]) -> int:
        """The verify step's width (positions per row) for these drafts: the narrowest of `widths` that holds the
        longest. Short drafts cost a short step (each position's experts are read); each width compiles once per
        window and tail."""
        return next(w for w in self.widths if w > max(map(len, drafts)))

    def tail(self, drafts: Sequence[Sequence[int]], active: Sequence[bool], constrained: bool) -> int:
        """The decode steps a verify step of these drafts runs after its verify round: decode_steps - 1, so that a
        row whose draft is refused, or that has none, still makes a decode block's tokens in the call; none where a
        row is constrained (its masks would depend on the tokens taken), or where every row drafts and the step is
        wide (at least HOT_WIDTH: rows climb there only while their drafts are kept whole, and the decode steps
        would cost more than they bring)."""
        hot = self.width(drafts) >= HOT_WIDTH and all(d for d, a in zip(drafts, active, strict=True) if a)
        return 0 if constrained or hot else self.decode_steps - 1

    def verify(self, positions: Sequence[int], active: Sequence[bool], drafts: Sequence[Sequence[int]],
               logprobs: bool = False, allowed: Sequence[Sequence[int] | None] | None = None,
               forced: Sequence[int] | None = None, window: int | None = None, tail: int = 0) -> StepTokens:
        """One verify step of every row from `positions` with its `drafts` (at most draft_tokens each; an empty
        one: the row makes one token, as a decode step), then `tail` decode steps of every row from its last kept
        token (verify_block); allowed / forced as for `decode`'s first step. The attention window is the one the
        furthest position needs, unless given."""
        B = self.batch_size
        K = self.width(drafts) - 1
        positions = np.asarray(positions, np.int32)
        active = np.asarray(active, bool)
        padded = np.zeros((B, K), np.int32)
        lengths = np.zeros(B, np.int32)
        for b, draft in enumerate(drafts):
            lengths[b] = len(draft)
            padded[b, : len(draft)] = draft
        if window is None:
            top = int((positions + lengths)[active].max()) if active.any() else 0
            window = attention_window(top + 1 + tail, self.max_seq_len)
        args = self._put_step([positions, active, padded, lengths, np.bool_(logprobs)], allowed, forced)
        return self._run(verify_block, self.params, self._take_state(), self.sampler(), *args, self.config, window,
                         tail)

    def warmup_programs(self, prompt_len: int, max_new_tokens: int | None = None,
                        all_buckets: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """Engine.warmup_programs, and the verify step of each width at each decode window, with each tail it can
        run with (`tail`: with more than one row, a row may not draft, or be constrained)."""
        programs = super().warmup_programs(prompt_len, max_new_tokens, all_buckets)
        B = self.batch_size
        windows = [kwargs["window"] for _, op, kwargs in programs if op == "decode"]
        for width in self.widths:
            drafts = [[0] * (width - 1)] * B
            tails = {self.tail(drafts, [True] * B, False), self.tail([[]] + drafts[1:], [True] * B, B > 1)}
            for tail in sorted(tails, reverse=True):
                what = f"verify {width - 1} drafted" + (f" + {tail} decode steps" if tail else "")
                programs += [(f"{what} (window {w})", "verify", dict(
                    positions=[0] * B, active=[False] * B, drafts=drafts, window=w, tail=tail)) for w in windows]
        return programs

    def warmup_steps(self, prompt_len: int, max_new_tokens: int | None = None,
                     all_buckets: bool = False) -> list[tuple[str, Callable[[], None]]]:
        """Engine.warmup_steps, and the draft model's (its prompt chunks and draft steps), if there is one."""
        steps = super().warmup_steps(prompt_len, max_new_tokens, all_buckets)
        if self.draft_engine is not None:
            steps += [(f"draft model: {what}", compile_step) for what, compile_step in
                      self.draft_engine.warmup_steps(prompt_len, max_new_tokens, all_buckets)]
        return steps


class Drafter(Protocol):
    """What drafts for the Speculator: NgramDrafter, draft_model.ModelDrafter."""

    def draft(self, requests: Sequence[Any], ks: Sequence[int]) -> list[list[int]]:
        """Row b's draft of at most ks[b] tokens (requests[b] is the request in row b; [] where ks[b] is 0)."""
        ...


class NgramIndex:
    """Prompt lookup over one context: the context, and where each n-gram in it last started with a token after it,
    kept up to date as the context grows, so that a lookup takes the same time however long the context is."""

    def __init__(self, n: int, tokens: Sequence[int] = ()):
        self.n = n
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            start = len(self.tokens) - self.n  # the n-gram that ends the context gets a token after it
            if start >= 0:
                self._latest[tuple(self.tokens[start:])] = start
            self.tokens.append(int(token))

    def match(self, k: int) -> tuple[int, int] | None:
        """Where the n-gram that ends the context last occurred before (its start), and how many tokens there match
        the context's end (the n-gram, and on back; counted up to k); None where it did not occur."""
        tokens, n = self.tokens, self.n
        start = self._latest.get(tuple(tokens[-n:]))
        if start is None:
            return None
        matched = n
        while matched < min(start + n, k) and tokens[start + n - 1 - matched] == tokens[-1 - matched]:
            matched += 1
        return start, matched

    def propose(self, k: int) -> list[int]:
        """The tokens after the match, at most k and at most twice as many as the match is long (a short match is a
        weak cue). Past the context's end (the match is the text just before: the output repeats itself), around
        the loop, as lookups in the context with the draft so far appended would find them."""
        found = self.match(k)
        if found is None:
            return []
        start, matched = found
        after = start + self.n
        loop = len(self.tokens) - after
        return [self.tokens[after + j % loop] for j in range(min(k, 2 * matched))]


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last `ngram` tokens, as
    code edits and quotes repeat their input, on around a loop where the output repeats itself (NgramIndex: one per
    request, grown by its new tokens at each call).

    A match's length predicts how much of its draft is kept. On the bundled model (greedy continuations of 60
    held-out prompts and the benchmark's; scripts/speculative_replay.py), the first drafted token was kept after 56%
    of the 2-token matches, 70% of 3-token ones, 66-80% of 4- and 5-token ones and 99% of matches of 12 tokens and
    more; and on 2 CPU cores a draft pays only where most of it is kept. So a draft needs a match of `ngram` tokens,
    by default 4: replayed by that script, matches of 4 or 5 tokens kept the floor where the text does not repeat
    (the least and the 10th-percentile held-out prompt) highest, 2 and 3 lower, at the same speed where it does."""

    def __init__(self, ngram: int = DEFAULT_NGRAM):
        if ngram < 1:
            raise ConfigError(f"the n-gram size must be at least 1, got {ngram}")
        self.ngram = ngram
        self._indexes: weakref.WeakKeyDictionary[Any, NgramIndex] = weakref.WeakKeyDictionary()

    def draft(self, requests: Sequence[Any], ks: Sequence[int]) -> list[list[int]]:
        return [self._index(r).propose(k) if k else [] for r, k in zip(requests, ks, strict=True)]

    def _index(self, request: Any) -> NgramIndex:
        index = self._indexes.get(request)
        if index is None or len(index.tokens) < len(request.prompt):
            index = self._indexes[request] = NgramIndex(self.ngram, request.prompt)
        index.extend(request.output[len(index.tokens) - len(request.prompt):])
        return index

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """The draft of at most k tokens for this context (a fresh index: for one-off lookups)."""
        return NgramIndex(self.ngram, np.asarray(context).tolist()).propose(k)


@dataclasses.dataclass
class DraftBudget:
    """How much a row drafts, from how its drafts fared. The draft length climbs a ladder (`lengths`: one less than
    the verify widths, e.g. 1, 3, 7, 31): a row starts at the first rung, a cheap probe, and climbs a rung each time its
    whole draft is kept (prompt lookup's drafts, once kept, tend to go on being kept: a copy or a loop); a draft kept
    in part steps down a rung. A draft refused outright pauses drafting for `pause` decode calls, a pause that
    doubles with each refusal in a row (up to MAX_PAUSE), and the row starts again from the first rung. Short pauses
    suffice: a refused probe costs little (its verify step runs a decode block's steps after it), and a long one
    would miss the start of a repetition."""

    lengths: tuple[int, ...] = (1,)
    rung: int = 0
    paused: int = 0  # decode calls left without drafting
    pause: int = 1

    FIRST_PAUSE = 1
    MAX_PAUSE = 8

    @property
    def length(self) -> int:
        """The draft length the row asks for now."""
        return self.lengths[self.rung]

    def drafting(self) -> bool:
        """Whether the row drafts at this decode call (a paused call counts towards the pause)."""
        if self.paused:
            self.paused -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        if accepted == 0:
            self.paused, self.pause = self.pause, min(2 * self.pause, self.MAX_PAUSE)
            self.rung = 0
            return
        self.pause = self.FIRST_PAUSE
        if accepted == drafted:
            if drafted >= self.length:  # a draft cut short (by the lookup or the room) proves less
                self.rung = min(self.rung + 1, len(self.lengths) - 1)
        else:
            self.rung = max(self.rung - 1, 0)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings: the method (one of METHODS), the most tokens drafted per step (None: the
    method's default, DEFAULT_DRAFT_TOKENS), the n-gram size (for "ngram")."""

    method: str = "ngram"
    draft_tokens: int | None = None
    ngram: int = DEFAULT_NGRAM

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.draft_tokens is None:
            object.__setattr__(self, "draft_tokens", DEFAULT_DRAFT_TOKENS[self.method])
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        if not isinstance(self.ngram, int) or self.ngram < 1:
            raise ConfigError(f"ngram must be an integer >= 1, got {self.ngram!r}")

    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        """The draft lengths a row climbs (DraftBudget): one less than each verify width for prompt lookup, whose
        drafts cost nothing to make; a draft model drafts draft_tokens tokens in each of its steps anyway."""
        if self.method == "draft_model":
            return (self.draft_tokens,)
        return tuple(w - 1 for w in verify_widths(self.draft_tokens))


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
        budget = self._budgets.get(request)
        if budget is None:
            budget = self._budgets[request] = DraftBudget(self.config.lengths)
        return budget

    def drafts(self, requests: Sequence[Any], rooms: Sequence[int]) -> list[list[int]] | None:
        """Each request's draft for a verify step (at most its room tokens and its budget's length; [] for None and
        rows that do not draft now), or None when no row has a draft: then the caller runs a decode block."""
        ks = []
        for request, room in zip(requests, rooms, strict=True):
            budget = self.budget(request) if request is not None and room > 0 else None
            ks.append(min(room, budget.length) if budget is not None and budget.drafting() else 0)
        if not any(ks):
            return None
        drafts = self.drafter.draft(requests, ks)
        if not any(drafts):
            return None
        # A draft shorter than asked for (the drafter's cue ran short) is cut to the longest of the lengths it holds:
        # a step's width is that length's, and tokens the drafter was unsure of would cost more than they bring.
        lengths = self.config.lengths
        drafts = [d if len(d) == k else d[: max((n for n in lengths if n <= len(d)), default=0)]
                  for d, k in zip(drafts, ks, strict=True)]
        return drafts if any(drafts) else None

    def record(self, request: Any, drafted: int, accepted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.budget(request).record(drafted, accepted)
