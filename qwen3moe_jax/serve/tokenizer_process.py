"""Long prompts tokenized in a child process, so that the tokenizer's hold on the GIL never stalls the event loop."""

from __future__ import annotations

import array
import subprocess
import sys
import threading

from qwen3moe_jax.io.tokenizer import Tokenizer

SHORT_TEXT_CHARS = 16_384  # tokenized in the request's thread (tens of ms at most); longer text in the child

# The child: a plain interpreter that imports only `tokenizers` (no main-module re-import, as multiprocessing's
# spawn would do, and no JAX). It reads the tokenizer's JSON, then texts, each sent as 8 bytes of length and
# UTF-8; it answers the ids as 8 bytes of length and uint32s. When the server goes, its stdin ends, and so does it.
_TOKENIZER_CHILD = """
import array, sys, tokenizers
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
def read():
    size = int.from_bytes(stdin.read(8) or bytes(8), "little")
    data = stdin.read(size)
    if not size or len(data) < size:
        sys.exit(0)
    return data.decode()
tokenizer = tokenizers.Tokenizer.from_str(read())
while True:
    ids = array.array("I", tokenizer.encode(read(), add_special_tokens=False).ids).tobytes()
    stdout.write(len(ids).to_bytes(8, "little") + ids)
    stdout.flush()
"""


class TokenizerProcess:
    """Tokenizes long texts in a child process, as Tokenizer.encode does. The tokenizers library holds the GIL
    while it encodes (3 s for 1 MB of text with a byte-level vocabulary, 1.4 s with the bundled model's), so
    in a thread it would still stall the event loop, /health included; in a child it stalls nothing. One
    child: long prompts wait for each other, short ones never wait for them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.spec = tokenizer.backend.to_str()
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None

    def encode(self, text: str) -> list[int]:
        """tokenizer.encode(text) (blocking: call it from a thread)."""
        if len(text) <= SHORT_TEXT_CHARS:
            return self.tokenizer.encode(text)
        with self.lock:
            if self.child is None or self.child.poll() is not None:  # first use, or it died: (re)start it
                self.child = subprocess.Popen([sys.executable, "-c", _TOKENIZER_CHILD], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE)
                self._send(self.spec)
            self._send(text)
            size = int.from_bytes(self.child.stdout.read(8), "little")
            ids = self.child.stdout.read(size)
            if len(ids) != size or (size == 0 and self.child.poll() is not None):
                raise RuntimeError("the tokenizer process died")
            return array.array("I", ids).tolist()

    def _send(self, text: str) -> None:
        data = text.encode()
        self.child.stdin.write(len(data).to_bytes(8, "little") + data)
        self.child.stdin.flush()
