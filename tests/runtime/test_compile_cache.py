"""JAX's persistent compilation cache for the CLI: where it goes (option, environment variable, per-user default,
off), and that a second process compiling the same steps reads them from it (JAX's own cache-hit events, as the
CLI reports them, and the files in the folder), not timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qwen3moe_jax.runtime import compile_cache
from qwen3moe_jax.tools.cli import build_parser

GENERATE = [sys.executable, "-m", "qwen3moe_jax", "generate", "--prompt", "def f(x):", "--max-new-tokens", "4"]


def test_where_the_cache_goes(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == tmp_path / "xdg" / "qwen3moe-jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.resolve(None) == Path.home() / ".cache" / "qwen3moe-jax" / "jax"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "opt")) == tmp_path / "opt"  # the option wins
    assert compile_cache.resolve("off") is None and compile_cache.resolve("OFF") is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve(None) is None
    assert compile_cache.resolve(str(tmp_path / "opt")) == tmp_path / "opt"

    parse = build_parser().parse_args
    assert parse(["serve", "--no-compile-cache"]).compile_cache == "off"
    assert parse(["generate", "--prompt", "x", "--compile-cache", "d"]).compile_cache == "d"
    assert parse(["serve"]).compile_cache_on_by_default
    assert parse(["generate", "--prompt", "x"]).compile_cache_on_by_default
    assert not parse(["bench"]).compile_cache_on_by_default  # bench measures compile times: off unless asked


def _generate(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([*GENERATE, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_second_run_reads_the_steps_from_the_cache(tmp_path):
    env = {**os.environ, compile_cache.ENV_VAR: str(tmp_path / "cache")}
    first = _generate(env=env)  # the environment variable's folder
    written = {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()}
    assert {"jit_prefill_chunk", "jit_decode_block"} <= written
    assert "from the compile cache" not in first

    second = _generate("--compile-cache", str(tmp_path / "cache"), env={**env, compile_cache.ENV_VAR: "off"})
    line = next(line for line in second.splitlines() if line.startswith("[compiled in"))
    hits, of = line.split(", ")[1].removesuffix(" programs from the compile cache]").split(" of ")
    assert int(hits) >= 2 and int(hits) == int(of)  # prefill and decode at least, and nothing compiled anew

    off = _generate("--no-compile-cache", env={**env, compile_cache.ENV_VAR: str(tmp_path / "unused")})
    assert "from the compile cache" not in off and not (tmp_path / "unused").exists()
