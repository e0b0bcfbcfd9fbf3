"""Drafting with a smaller model of the same vocabulary (speculative decoding's draft model, e.g. dense Qwen3-0.6B
for Qwen3-30B-A3B): a second engine, over a KV cache of its own with the target's rows and length, drafts each row's
next tokens greedily (`ModelDrafter`).

The draft's cache is kept in step with the requests lazily. For each request the drafter remembers the tokens its
row's cache holds at positions 0, 1, ... (what it was fed). Before drafting, the longest prefix of those that is
still the request's context (prompt and output so far) is what the cache holds rightly; the rest of the context is
fed from there (in prompt chunks when it is long: a new request, or a row back from a pause in drafting), and the
draft then feeds its own tokens for K - 1 greedy steps. After a verify step kept d1..da of the draft and a token of
the target's own, the cache holds the context up to min(a, K - 1) drafted tokens already, and the next draft feeds
one or two tokens. Slots past what is right need no undoing: attention reads a row's slots only up to the position
being computed, and each later feed writes its position before it is read.

A greedy draft is a point mass, so the verify step's rule (keep a drafted token iff the target's own draw is that
token, speculative.py) keeps the target's tokens, greedy or sampled, exactly those of decoding without speculation.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params
from qwen3moe_jax.model.sharding import constrain
from qwen3moe_jax.model.transformer import attention_window, forward, lm_logits
from qwen3moe_jax.runtime.engine import Engine, Slots, bucket_length, step_program

# The most context tokens a draft step feeds before drafting (widths 1, 2, 4, 8: one compile each); a longer gap
# is filled by prompt chunks first. After a verify step the gap is one or two tokens, after a decode block
# decode_steps more.
MAX_FEED = 8


@step_program("config", "window", "steps")
def draft_block(params: Params, slots: Slots, feed: jax.Array, start: jax.Array, length: jax.Array,
                active: jax.Array, config: ModelConfig, window: int, steps: int) -> tuple[jax.Array, Slots]:
    """Row b feeds feed[b, :length[b]] ([B, F], right-padded) at positions start[b] ..., then drafts `steps` tokens
    greedily: the argmax after its last fed token, fed in turn, and so on. Rows not `active` are parked at the cache
    length (left as they were). Returns the drafts [B, steps] and the state."""
    S = slots.history.shape[1]
    rows = jnp.arange(feed.shape[0])
    start = jnp.where(active, start, S)
    hidden, cache, _ = forward(params, feed, start, slots.cache, config, window)
    greedy = lambda h: jnp.argmax(constrain(lm_logits(params, h), (None, None)), -1).astype(jnp.int32)  # noqa: E731
    token = greedy(hidden[rows, jnp.maximum(length - 1, 0)])
    drafts, position = [token], start + length
    for _ in range(steps - 1):  # unrolled, as decode_block's steps are
        hidden, cache, _ = forward(params, token[:, None], position, cache, config, window)
        token = greedy(hidden[:, 0])
        drafts.append(token)
        position = position + 1
    return constrain(jnp.stack(drafts, axis=1), (None, None)), Slots(cache, slots.history, slots.next_token)


class DraftEngine(Engine):
    """The draft model's Engine: its prefill fills a row's cache from a long context, `draft` drafts `draft_tokens`
    tokens per row."""

    STEPS = Engine.STEPS + ("draft",)

    def __init__(self, *args: Any, draft_tokens: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.draft_tokens = draft_tokens

    def warmup_programs(self, prompt_len: int, max_new_tokens: int | None = None,
                        all_buckets: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """The prefill chunk shapes of Engine.warmup_programs, and the draft step of each feed width at each of its
        decode windows (the draft model runs no decode block)."""
        B = self.batch_size
        programs = []
        for what, op, kwargs in super().warmup_programs(prompt_len, max_new_tokens, all_buckets):
            if op != "decode":
                programs.append((what, op, kwargs))
                continue
            width = 1
            while width <= MAX_FEED:
                programs.append((f"draft {self.draft_tokens} after {width} fed (window {kwargs['window']})", "draft",
                                 dict(feeds=[[0] * width] + [[]] * (B - 1), starts=[0] * B,
                                      steps=self.draft_tokens, window=kwargs["window"])))
                width *= 2
        return programs

    def draft(self, feeds: Sequence[Sequence[int]], starts: Sequence[int], steps: int,
              window: int | None = None) -> jax.Array:
        """Each row feeds its tokens `feeds[b]` (at most MAX_FEED; [] for a row that does not draft) at starts[b]
        ... and drafts `steps` tokens after them (see draft_block)."""
        B = self.batch_size
        lengths = np.array([len(f) for f in feeds], np.int32)
        active = lengths > 0
        padded = np.zeros((B, bucket_length(int(lengths.max()), MAX_FEED, minimum=1)), np.int32)
        for b, tokens in enumerate(feeds):
            padded[b, : len(tokens)] = tokens
        starts = np.asarray(starts, np.int32)
        if window is None:
            top = int((starts + lengths)[active].max()) + steps - 1 if active.any() else 1
            window = attention_window(top, self.max_seq_len)
        args = self._put((padded, starts, lengths, active))
        return self._run(draft_block, self.params, self._take_state(), *args, self.config, window, steps)


class ModelDrafter:
    """Drafts each row's next `k` tokens with a draft model (the module docstring says how its cache keeps up)."""

    def __init__(self, engine: DraftEngine):
        self.engine = engine
        self.steps = engine.draft_tokens  # every draft step drafts this many: one compiled width
        self._fed: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()

    def draft(self, requests: Sequence[Any], ks: Sequence[int]) -> list[list[int]]:
        """Row b's draft of ks[b] tokens (requests[b] in row b; [] where ks[b] is 0), in one draft step."""
        B = self.engine.batch_size
        feeds: list[list[int]] = [[] for _ in range(B)]
        starts, contexts = [0] * B, {}
        for b, (request, k) in enumerate(zip(requests, ks, strict=True)):
            if not k:
                continue
            context = np.asarray(request.prompt + request.output, np.int32)
            held = self._held(request, context)
            while len(context) - held > MAX_FEED:  # a long gap: prompt chunks first (the last token is fed below)
                take = min(self.engine.chunk_size, len(context) - 1 - held)
                self.engine.prefill(b, context[held: held + take].tolist(), held, len(context))
                held += take
                self._fed[request] = context[:held]
            feeds[b], starts[b], contexts[b] = context[held:].tolist(), held, context
        drafts = np.asarray(self.engine.draft(feeds, starts, self.steps))
        for b, context in contexts.items():
            self._fed[requests[b]] = np.concatenate([context, drafts[b, : self.steps - 1]])
        return [drafts[b, :k].tolist() for b, k in enumerate(ks)]

    def _held(self, request: Any, context: np.ndarray) -> int:
        """How many of the context's tokens the row's cache holds rightly: the prefix it was fed that is still the
        context, short of the last token (which a draft step feeds to draft after it)."""
        fed = self._fed.get(request, context[:0])
        n = min(len(fed), len(context) - 1)
        differ = np.flatnonzero(fed[:n] != context[:n])
        return int(differ[0]) if len(differ) else n


def check_draft_vocabulary(target: tuple[ModelConfig, Tokenizer | None], draft: tuple[ModelConfig, Tokenizer | None],
                           ) -> None:
    """A draft model must speak the target's token ids: the same vocabulary size and, where both carry a tokenizer,
    the same token at every id both have (a GGUF file lists padding tokens a tokenizer.json leaves out)."""
    (config, tokenizer), (draft_config, draft_tokenizer) = target, draft
    if draft_config.vocab_size != config.vocab_size:
        raise ConfigError(f"the draft model's vocabulary has {draft_config.vocab_size} tokens, the target's "
                          f"{config.vocab_size}: a draft model must share the target's tokenizer")
    if tokenizer is None or draft_tokenizer is None:
        return
    ours = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    theirs = {i: t for t, i in draft_tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    differ = sorted(i for i in ours.keys() & theirs.keys() if ours[i] != theirs[i])
    if differ:
        i = differ[0]
        raise ConfigError(f"the draft model's tokenizer differs from the target's at {len(differ)} token ids (id {i}: "
                          f"{theirs[i]!r}, not {ours[i]!r}): a draft model must share the target's tokenizer")
