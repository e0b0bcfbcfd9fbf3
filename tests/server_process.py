"""Run `qwen3moe-jax serve` in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, preset: str | None = "tiny") -> Iterator[str]:
    """`serve --preset tiny ARGS...` (preset None: the bundled model) until the context ends; yields its base
    URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3moe_jax", "serve", *(["--preset", preset] if preset else []),
         "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health").json()["status"] == "ready":
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
