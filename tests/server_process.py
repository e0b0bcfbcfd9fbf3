"""Run `qwen3moe-jax serve` in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


class ServerURL(str):
    """A running server's base URL, which also reads what the server has written to its log so far."""

    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, preset: str | None = "tiny") -> Iterator[ServerURL]:
    """`serve --preset tiny ARGS...` (preset None: the bundled model) until the context ends; yields its base
    URL once /health answers (a ServerURL: `.log()` is its output so far)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w", prefix="qwen3moe-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3moe_jax", "serve", *(["--preset", preset] if preset else []),
         "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.log_path = Path(log.name)
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health").json()["status"] == "ready":
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{url.log()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        url.log_path.unlink()
