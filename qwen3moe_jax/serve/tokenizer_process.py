"""Long prompts tokenized in a child process, so that the tokenizer's hold on the GIL never stalls the event loop."""

from __future__ import annotations

import array
import os
import select
import subprocess
import sys
import threading
import time

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


class TokenizerUnavailable(RuntimeError):
    """The tokenizer's child process died twice in a row, or took longer than READ_TIMEOUT_S to answer."""


READ_TIMEOUT_S = 60.0  # 1 MB of text takes ~3 s: a child this late is stuck, and is replaced


class TokenizerProcess:
    """Tokenizes long texts in a child process, as Tokenizer.encode does. The tokenizers library holds the GIL
    while it encodes (3 s for 1 MB of text with a byte-level vocabulary, 1.4 s with the bundled model's), so
    in a thread it would still stall the event loop, /health included; in a child it stalls nothing. One
    child: long prompts wait for each other, short ones never wait for them. A child that dies is replaced, and
    the text sent again once; every read has a deadline."""

    def __init__(self, tokenizer: Tokenizer, timeout_s: float = READ_TIMEOUT_S):
        self.tokenizer = tokenizer
        self.spec = tokenizer.backend.to_str()
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None

    def encode(self, text: str) -> list[int]:
        """tokenizer.encode(text) (blocking: call it from a thread). TokenizerUnavailable if the child fails twice
        or does not answer in time."""
        if len(text) <= SHORT_TEXT_CHARS:
            return self.tokenizer.encode(text)
        with self.lock:
            return self._encode_retrying(text, retries=1)

    def _encode_retrying(self, text: str, retries: int) -> list[int]:
        try:
            return self._encode_in_child(text)
        except _ChildDied as err:
            self._stop_child()
            if retries == 0 or err.timed_out:
                raise TokenizerUnavailable(f"the tokenizer process {err}") from None
        return self._encode_retrying(text, retries - 1)

    def _encode_in_child(self, text: str) -> list[int]:
        if self.child is None or self.child.poll() is not None:  # first use, or it died: (re)start it
            self.child = subprocess.Popen([sys.executable, "-c", _TOKENIZER_CHILD], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, bufsize=0)
            self._send(self.spec)
        self._send(text)
        deadline = time.monotonic() + self.timeout_s
        size = int.from_bytes(self._read(8, deadline), "little")
        return array.array("I", self._read(size, deadline)).tolist()

    def _send(self, text: str) -> None:
        data = text.encode()
        try:
            self.child.stdin.write(len(data).to_bytes(8, "little") + data)
            self.child.stdin.flush()
        except OSError as err:  # a broken pipe: the child is gone
            raise _ChildDied(f"died ({err})") from None

    def _read(self, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes of the child's answer, by the deadline."""
        out = bytearray()
        fd = self.child.stdout.fileno()
        while len(out) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _ChildDied(f"did not answer within {self.timeout_s:.0f} s", timed_out=True)
            chunk = os.read(fd, size - len(out))
            if not chunk:  # end of the pipe: the child is gone
                raise _ChildDied(f"died (exit status {self.child.wait()})")
            out += chunk
        return bytes(out)

    def _stop_child(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None


class _ChildDied(Exception):
    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out
