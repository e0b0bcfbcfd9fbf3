"""Constrained decoding: a request's JSON schema, regular expression or grammar, enforced token by token with
llguidance (the grammar engine behind llama.cpp's and vLLM's structured outputs; no torch needed).

Each constrained request holds a `Constraint`: an llguidance matcher that follows the tokens the request has
taken and gives, before each step, the set of tokens that keep the output matching. The set travels to the
jit step as a packed bitmask (32 token ids per int32 word, `mask_words` per row), an input like any other, so a
new schema never compiles anything; an unconstrained row's words are all ones (ALL_ALLOWED). Where the grammar
allows only one way on (a JSON key and its quotes, say), llguidance gives the token ("fast-forward" tokens):
the step takes it as it is instead of sampling.

A decode block of several steps needs each step's mask before the step samples, and the mask depends on the
token sampled just before. So the block hands each step's tokens to the host as soon as they are sampled
(`BlockGrammar`, called from inside the jit step): each constrained row's Constraint takes its token and works
out the next step's mask or forced token, while the device runs the next step's forward pass, which does not
need it. The work after a block's last step is the first step's of the next block, which the host passes in
with the block's inputs. So every token is sampled under its own state's mask, as with one step per call, and
is taken (checked, and the structure's completion known) before the scheduler delivers it.

On the CPU backend the call is cpu_kernels.host_step; elsewhere (GPU, TPU, a mesh) JAX's io_callback, which runs
on one device (on several hosts, on process 0, which holds the requests).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np

from qwen3moe_jax.errors import ConstraintError

ALL_ALLOWED = -1  # an int32 word with every bit set: all 32 of its tokens allowed
# JSON is written as Python's json.dumps and Qwen3's chat template write it ({"a": 1, "b": [2, 3]}), with no
# free whitespace: llguidance's default allows it, and a weak model pads with it forever. A schema's own
# "x-guidance" options override this.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def mask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def unconstrained_mask(rows: int, vocab_size: int) -> np.ndarray:
    return np.full((rows, mask_words(vocab_size)), ALL_ALLOWED, np.int32)


def grammar_of(json_schema: str | None, regex: str | None, grammar: str | None) -> str | None:
    """llguidance's grammar text for a request's json_schema, regex or Lark grammar (at most one; None: none)."""
    import llguidance

    if json_schema is not None:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_STYLE)
        except ValueError as err:
            raise ConstraintError(f"json_schema is not a JSON object: {err}") from err
    if regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(grammar)
    return None


def canonical_schema(schema: Any) -> str:
    """A JSON schema given as a dict or as JSON text, as JSON text (so SamplingParams stays hashable)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ConstraintError(f"json_schema is not valid JSON: {err}") from err
    if not isinstance(schema, dict | bool):
        raise ConstraintError(f"json_schema must be a JSON schema (an object), got {type(schema).__name__}")
    try:
        return json.dumps(schema, allow_nan=False)  # key order kept: it is the order properties are written in
    except (TypeError, ValueError) as err:
        raise ConstraintError(f"json_schema is not JSON-serialisable: {err}") from err


class Grammars:
    """Builds Constraints for one model: llguidance's view of the model's tokenizer, made once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import llguidance

        self.vocab_size = vocab_size
        # n_vocab: the model's rows may outnumber the tokenizer's ids; llguidance never allows the extra ones.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for `grammar` (grammar_of's text); ConstraintError with llguidance's reason if invalid."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid constraint: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state. It takes the request's tokens in order (`take`), possibly ahead of their
    delivery (inside a decode block), and keeps for each what delivering it must know (`taken`): whether the
    grammar refused it, and whether it completed the structure. After each token taken it works out what the
    next step may sample: `next_forced`, a token the grammar forces (-1: none), else `next_mask`."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = mask_words(vocab_size)
        self._outcomes: collections.deque[tuple[str | None, bool]] = collections.deque()
        self.next_forced, self.next_mask = -1, np.full(self.words, ALL_ALLOWED, np.int32)

    def mask(self) -> np.ndarray:
        """The allowed next tokens as int32 words [mask_words] (bit t % 32 of word t // 32)."""
        mask = np.empty(self.words, np.int32)
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        return mask

    def take(self, token: int) -> bool:
        """Advance past `token`, the request's next token, and work out the step after it (`next_forced`, else
        `next_mask`; the mask is left as it was when a token is forced). False (and the matcher stays) if the
        grammar refuses the token, which one sampled under the state's mask never is (a -1 for NaN logits is)."""
        ok = 0 <= token < self.words * 32 and self.matcher.consume_token(token)
        self._outcomes.append((None if ok else self.matcher.get_error() or f"token {token} is not allowed here",
                               ok and self.matcher.is_stopped()))
        if ok:
            forced = self.matcher.compute_ff_tokens()
            self.next_forced = forced[0] if forced else -1
            if not forced:
                self.matcher.unsafe_compute_mask_ptr(self.next_mask.ctypes.data, self.next_mask.nbytes)
        return ok

    def taken(self) -> tuple[str | None, bool]:
        """For the oldest token taken and not yet delivered: (why the grammar refused it, or None; whether the
        structure is complete with it: nothing but the end may follow)."""
        return self._outcomes.popleft()


class BlockGrammar:
    """The host side of the constrained rows of a decode block, which engine.decode_block calls after each step.
    `begin` hands it each row's Constraint (None: free) before the block. `fill` makes each constrained row's
    Constraint take the token its row sampled and writes the next step's forced tokens (-1: none) and masks;
    calling the object does the same into new arrays (the form of jax's io_callback). A Constraint that raises is
    that row's failure alone (`failures`, for the scheduler to end its request with): the row samples freely for
    the rest of the block, and the other rows go on."""

    def __init__(self, rows: int, vocab_size: int, sharding: Any = None):
        self.rows: list[Constraint | None] = [None] * rows
        self.words = mask_words(vocab_size)
        self.sharding = sharding  # the device an io_callback runs on: process 0's, on a multi-process mesh
        self.host_step: int | None = None  # its number with cpu_kernels.host_step, where that calls it instead
        self.failures: dict[int, tuple[int, Exception]] = {}  # row -> (the step whose token it failed on, error)
        self._step = 0

    def begin(self, rows: list[Constraint | None]) -> None:
        """Take the rows' Constraints for the next decode block."""
        self.rows, self.failures, self._step = list(rows), {}, 0

    def fill(self, tokens: np.ndarray, forced: np.ndarray, masks: np.ndarray) -> None:
        forced.fill(-1)
        masks.fill(ALL_ALLOWED)
        for b, constraint in enumerate(self.rows):
            if constraint is None:
                continue
            try:
                # A token the grammar refuses is recorded for its delivery, which ends the request with the reason.
                if constraint.take(int(tokens[b])):
                    forced[b] = constraint.next_forced
                    if forced[b] < 0:
                        masks[b] = constraint.next_mask
            except Exception as err:
                self.failures[b] = (self._step, err)
                self.rows[b] = None
                forced[b], masks[b] = -1, ALL_ALLOWED
        self._step += 1

    def __call__(self, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        forced, masks = np.empty(len(self.rows), np.int32), np.empty((len(self.rows), self.words), np.int32)
        self.fill(np.asarray(tokens), forced, masks)
        return forced, masks
