"""Tokenizers, backed by the Hugging Face `tokenizers` library."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

# The Qwen special tokens a small byte-level vocabulary carries, in id order after the 256 bytes.
BYTE_VOCAB_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text; special tokens in text encode to their single ids."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Bytes as tokens (ids 0..255, no merges) plus BYTE_VOCAB_SPECIALS: for random-weight presets."""
        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        # Order the 256 byte symbols by the byte they stand for, so token id == byte value.
        by_byte = sorted(byte_chars, key=_byte_of_symbol)
        backend = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(by_byte)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(BYTE_VOCAB_SPECIALS))
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def decode_stream(self, ids: Iterable[int]) -> Iterable[str]:
        """Text deltas as ids arrive; holds back an incomplete UTF-8 character until it is whole."""
        seen: list[int] = []
        emitted = 0
        for token in ids:
            seen.append(token)
            text = self.decode(seen)
            if text.endswith("\ufffd"):
                continue
            yield text[emitted:]
            emitted = len(text)


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
