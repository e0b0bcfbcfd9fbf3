"""Qwen's tokenizer: byte-level BPE behind Qwen2's pre-tokenizer split, run by the Hugging Face `tokenizers`
library. Built from a tokenizer.json, from a GGUF file's vocabulary metadata, or as a bare byte vocabulary
for random-weight presets; it carries the chat template that came with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from qwen3moe_jax.errors import CheckpointError, ConfigError
from qwen3moe_jax.io.chat_template import render_chat

# The pre-tokenizer split of Qwen2/2.5/3 (llama.cpp's `qwen2` pre-type): contractions, letters with one
# leading non-letter, single digits, punctuation runs, newline runs, other whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The Qwen special tokens a byte vocabulary carries, in id order after the 256 bytes.
BYTE_VOCAB_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
# The added tokens of Qwen3's real vocabulary, in its id order: control tokens (special, never shown when
# special tokens are skipped) and then plain added tokens (matched whole in text, but shown like text).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
QWEN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)


@dataclass(frozen=True)
class GGUFVocab:
    """A vocabulary as GGUF stores it: `tokenizer.ggml.tokens`, `.token_type` (gguf.TokenType) and `.merges`
    ("left right", in rank order)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text; special tokens in text encode to their single ids."""

    def __init__(self, backend: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.backend = backend
        self.chat_template = chat_template  # None: render_chat falls back to plain ChatML
        self.bos_token = bos_token  # as the chat template sees them
        self.eos_token = eos_token

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """A tokenizer.json; kwargs as for the constructor."""
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception on a malformed file
            raise CheckpointError(f"{path} is not a readable tokenizer.json: {err}") from None
        return cls(backend, **kwargs)

    @classmethod
    def from_gguf_vocab(cls, vocab: GGUFVocab, **kwargs: Any) -> Tokenizer:
        """Tokens of type CONTROL become special added tokens and USER_DEFINED plain added tokens: both are
        matched whole in text, as llama.cpp does when it parses special tokens. UNUSED tokens (the padding
        of the vocabulary up to the embedding size) can be decoded but are never produced by encoding."""
        if len(vocab.tokens) != len(vocab.token_types):
            raise CheckpointError(f"GGUF vocabulary has {len(vocab.tokens)} tokens but {len(vocab.token_types)} types")
        ids = {token: i for i, token in enumerate(vocab.tokens)}
        try:
            merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
            bpe = models.BPE(vocab=ids, merges=merges)
        except Exception as err:  # tokenizers raises its own exception type on unknown merge symbols
            raise CheckpointError(f"GGUF tokenizer merges do not fit its tokens: {err}") from None
        added = [
            AddedToken(token, special=kind == TokenType.CONTROL, normalized=False)
            for token, kind in zip(vocab.tokens, vocab.token_types, strict=True)
            if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
        ]
        return cls(_qwen2_backend(bpe, added), **kwargs)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Bytes as tokens (id == byte value, no merges) plus BYTE_VOCAB_SPECIALS: for random-weight presets."""
        by_byte = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
        bpe = models.BPE(vocab={symbol: i for i, symbol in enumerate(by_byte)}, merges=[])
        specials = [AddedToken(t, special=True, normalized=False) for t in BYTE_VOCAB_SPECIALS]
        return cls(_qwen2_backend(bpe, specials), bos_token="<|endoftext|>", eos_token="<|im_end|>")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, specials: Sequence[str] = BYTE_VOCAB_SPECIALS,
              added: Sequence[str] = (), chat_template: str | None = None) -> Tokenizer:
        """A new byte-level BPE vocabulary learned from `texts`: the special tokens first (ids 0..), then the
        256 byte symbols, then merges, then the plain `added` tokens last, `vocab_size` tokens in all."""
        backend = _qwen2_backend(models.BPE(), [])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added), special_tokens=list(specials),
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
        return cls(backend, chat_template, bos_token=specials[0] if specials else None,
                   eos_token="<|im_end|>" if "<|im_end|>" in specials else None)

    def to_gguf_vocab(self, vocab_size: int) -> GGUFVocab:
        """This tokenizer as GGUF metadata, its ids padded with UNUSED `[PAD<id>]` tokens up to `vocab_size`
        (the embedding rows), as llama.cpp's converter does."""
        data = json.loads(self.backend.to_str())
        if data["model"]["type"] != "BPE" or _split_pattern(data.get("pre_tokenizer")) != QWEN2_SPLIT:
            raise ConfigError("only byte-level BPE tokenizers with Qwen2's pre-tokenizer can be written to GGUF")
        tokens: list[str | None] = [None] * vocab_size
        types = [TokenType.UNUSED] * vocab_size
        entries = [(i, t, TokenType.NORMAL) for t, i in data["model"]["vocab"].items()]
        entries += [(a["id"], a["content"], TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
                    for a in data["added_tokens"]]
        for i, token, kind in entries:
            if i >= vocab_size:
                raise ConfigError(f"token {token!r} has id {i}, beyond the model's vocab_size {vocab_size}")
            tokens[i], types[i] = token, kind
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        return GGUFVocab(
            tokens=[f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)],
            token_types=[int(t) for t in types],
            merges=merges,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Text deltas as ids arrive (see TextDecoder); they always join to decode(ids)."""
        decoder = TextDecoder(self)
        for token in ids:
            if delta := decoder.step(token):
                yield delta
        if rest := decoder.finish():
            yield rest

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for `messages` (see qwen3moe_jax.io.chat_template.render_chat)."""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


class TextDecoder:
    """Turns token ids into text one id at a time. A multi-byte character split across tokens is held
    back until it is whole; bytes that never complete one come out as U+FFFD from finish(), so the
    deltas always join to Tokenizer.decode of the ids seen."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self._ids: list[int] = []
        self._emitted = 0

    def step(self, token: int) -> str:
        self._ids.append(token)
        delta = self._stream.step(self._tokenizer.backend, token) or ""
        self._emitted += len(delta)
        return delta

    def finish(self) -> str:
        """Whatever the ids decode to beyond the deltas given so far (held-back partial characters)."""
        rest = self._tokenizer.decode(self._ids)[self._emitted:]
        self._emitted += len(rest)
        return rest


def _qwen2_backend(bpe: models.BPE, added: list[AddedToken]) -> HFTokenizer:
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(added)
    return backend


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of the (first) Split step of a serialized pre-tokenizer, if any."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    for step in steps:
        if step.get("type") == "Split":
            return step["pattern"].get("Regex")
    return None


def _byte_of_symbol(symbol: str) -> int:
    # GPT-2 byte-level mapping: printable bytes map to themselves, the rest to 256 + n in byte order.
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
