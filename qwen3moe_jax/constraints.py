"""Constrained decoding: a request's JSON schema, regular expression or grammar, enforced token by token with
llguidance (the grammar engine behind llama.cpp's and vLLM's structured outputs; no torch needed).

Each constrained request holds a `Constraint`: an llguidance matcher that follows the tokens the request has
accepted and gives, before each step, the set of tokens that keep the output matching. The set travels to the
jit step as a packed bitmask (32 token ids per int32 word, `mask_words` per row), an input like any other, so a
new schema never compiles anything; an unconstrained row's words are all ones (ALL_ALLOWED).

Where the grammar allows only one way on (a JSON key and its quotes, say), llguidance gives those tokens
("fast-forward" tokens): a block takes them as they are instead of sampling, and samples from the step after.

How the mask combines with sampling (sampling.sample): the draw is the Gumbel-max draw of the unconstrained
sampler restricted to the allowed tokens (greedy: the most likely allowed token). So a draw under a larger set
of tokens that lands in the allowed set is exactly the draw under the allowed set. The scheduler relies on
this to keep several decode steps per device call: the sampled steps of a block all use the mask of its first
sampled step's state, and on the host each later token is kept while it is allowed in its own state and that
state's allowed tokens all were in the block's mask (inside a JSON string, say); from the first that fails, the
row goes back and redoes that step in the next block. The tokens are the same as with each state's own mask
at every step (tests/test_constraints.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qwen3moe_jax.errors import ConstraintError, SamplingError

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
    """One request's grammar state: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = mask_words(vocab_size)
        self._mask: np.ndarray | None = None  # the mask of the current state, once computed
        self._forced = 0  # forced tokens the matcher has taken that the request has not delivered yet

    def plan(self, steps: int) -> tuple[list[int], np.ndarray]:
        """For a block of `steps` steps: the tokens the grammar forces next (at most `steps`, taken by the matcher
        now; `forced_taken` delivers each), and the mask of the state after them, which the rest samples under."""
        forced = self.matcher.compute_ff_tokens()[:steps]
        for token in forced:
            if not self.matcher.consume_token(token):
                raise SamplingError(f"the grammar refused a token it forced: {self.error()}")
        if forced:
            self._mask, self._forced = None, len(forced)
        return forced, self.mask()

    def forced_taken(self) -> None:
        self._forced -= 1

    def mask(self) -> np.ndarray:
        """The allowed next tokens as int32 words [mask_words] (bit t % 32 of word t // 32)."""
        if self._mask is None:
            self._mask = np.empty(self.words, np.int32)
            self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        return self._mask

    def accept(self, token: int, drawn_under: np.ndarray | None = None) -> bool:
        """Take `token` (True), drawn under the mask `drawn_under` (None: under this state's own mask), if it
        is the token a draw under this state's mask gives: it is allowed, and every allowed token was in
        `drawn_under` too (sampling.sample). Otherwise change nothing (False). The mask decides, not the
        matcher's consume check, which also takes some tokens its mask leaves out (non-canonical ones)."""
        mask = self.mask()
        if not 0 <= token < self.words * 32 or not mask[token >> 5] >> (token & 31) & 1:
            return False
        if drawn_under is not None and np.any(mask & ~drawn_under):
            return False
        self._mask = None
        return self.matcher.consume_token(token)

    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def complete(self) -> bool:
        """The structure is complete with the tokens delivered: nothing but the end may follow."""
        return self._forced == 0 and self.matcher.is_stopped()
