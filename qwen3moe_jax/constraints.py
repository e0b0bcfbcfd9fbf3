"""Constrained decoding: a request's JSON schema, regular expression or grammar, enforced token by token with
llguidance (the grammar engine behind llama.cpp's and vLLM's structured outputs; no torch needed).

Each constrained request holds a `Constraint`: an llguidance matcher that follows the tokens the request has
accepted and gives, before each step, the set of tokens that keep the output matching. The set travels to the
jit step as a packed bitmask (32 token ids per int32 word, `mask_words` per row), an input like any other, so a
new schema never compiles anything; an unconstrained row's words are all ones (ALL_ALLOWED).

How the mask combines with sampling (sampling.sample): the draw is the Gumbel-max draw of the unconstrained
sampler restricted to the allowed tokens. So a draw that the grammar allows anyway is exactly the unconstrained
draw; the scheduler relies on this to keep several decode steps per device call: the mask applies to a block's
first step, and each later token of the block is checked on the host, kept while the grammar accepts it and
dropped from the first one it refuses (that step is redone, masked, in the next block). The tokens are the
same as with a mask at every step (tests/test_constraints.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qwen3moe_jax.errors import SamplingError

ALL_ALLOWED = -1  # an int32 word with every bit set: all 32 of its tokens allowed
# JSON is generated compact-ish (one space after ':' and ','), not with free whitespace: llguidance's default
# lets a weak model pad with whitespace forever. A schema's own "x-guidance" options still override this.
JSON_DEFAULTS = {"whitespace_flexible": False}


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
            return llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_DEFAULTS)
        except ValueError as err:
            raise SamplingError(f"json_schema is not a JSON object: {err}") from err
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
            raise SamplingError(f"json_schema is not valid JSON: {err}") from err
    if not isinstance(schema, dict | bool):
        raise SamplingError(f"json_schema must be a JSON schema (an object), got {type(schema).__name__}")
    try:
        return json.dumps(schema, allow_nan=False)  # key order kept: it is the order properties are written in
    except (TypeError, ValueError) as err:
        raise SamplingError(f"json_schema is not JSON-serialisable: {err}") from err


class Grammars:
    """Builds Constraints for one model: llguidance's view of the model's tokenizer, made once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import llguidance

        self.vocab_size = vocab_size
        # n_vocab: the model's rows may outnumber the tokenizer's ids; llguidance never allows the extra ones.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for `grammar` (grammar_of's text); SamplingError with llguidance's reason if invalid."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SamplingError(f"invalid constraint: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = mask_words(vocab_size)
        self._mask: np.ndarray | None = None  # the mask of the current state, once computed

    def mask(self) -> np.ndarray:
        """The allowed next tokens as int32 words [mask_words] (bit t % 32 of word t // 32)."""
        if self._mask is None:
            self._mask = np.empty(self.words, np.int32)
            self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        return self._mask

    def accept(self, token: int) -> bool:
        """Take `token` if the mask allows it next (True); otherwise change nothing (False). The mask, not the
        matcher's own consume check, decides: llguidance may accept a token its mask leaves out (a
        non-canonical tokenization), and a token must be allowed exactly when a masked draw could give it."""
        if not 0 <= token < self.words * 32 or not self.mask()[token >> 5] >> (token & 31) & 1:
            return False
        self._mask = None
        return self.matcher.consume_token(token)

    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def complete(self) -> bool:
        """The structure is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()
