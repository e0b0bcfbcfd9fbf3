"""The README's examples run as written, so they cannot rot. Its fenced blocks follow one convention:

- ```python: runs on the bundled model, top to bottom, in a fresh namespace (here, in a scratch folder);
- ```python server / ```bash server: run against `qwen3moe-jax serve` with no model argument (the bundled
  model), started here on a free port that replaces the README's 8000;
- ```python checkpoint: needs a real checkpoint; compiled, not run;
- ```bash: not run, but every `qwen3moe-jax` command in it must parse with the CLI's own parser.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwen3moe_jax.tools.cli import build_parser

README = Path(__file__).parent.parent / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(info.strip(), body) for info, body in FENCE.findall(README.read_text())]
KINDS = {"python", "python server", "python checkpoint", "bash", "bash server", ""}


def blocks(info: str) -> list[str]:
    return [body for kind, body in BLOCKS if kind == info]


def test_every_block_follows_the_convention():
    assert {kind for kind, _ in BLOCKS} <= KINDS, "a block with a fence this test does not know"
    assert blocks("python") and blocks("python server") and blocks("bash server")


@pytest.mark.parametrize("code", blocks("python"), ids=lambda code: code.splitlines()[0][:40])
def test_python_block_runs_on_the_bundled_model(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # what it writes (exports) lands here
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # each example shows something


@pytest.mark.parametrize("code", blocks("python checkpoint"), ids=lambda code: code.splitlines()[0][:40])
def test_checkpoint_block_compiles(code):
    compile(code, "README.md", "exec")


def _commands(script: str) -> list[list[str]]:
    """The `qwen3moe-jax` commands of a shell block: continuation lines joined, comments and environment
    assignments dropped."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        if re.match(r"^([A-Z_]+=\S+ )*qwen3moe-jax ", line):
            words = shlex.split(line, comments=True)
            commands.append(words[words.index("qwen3moe-jax") + 1:])
    return commands


def test_cli_commands_in_shell_blocks_parse():
    commands = [c for kind in ("bash", "bash server") for script in blocks(kind) for c in _commands(script)]
    assert len(commands) >= 5
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's `qwen3moe-jax {shlex.join(argv)}` does not parse")


@pytest.fixture(scope="module")
def server():
    """`qwen3moe-jax serve` as the README starts it (no model: the bundled one), with a small warm-up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "qwen3moe_jax", "serve", "--port", str(port),
                                "--warmup-tokens", "16"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    startup = []  # what it prints up to "[compiled in ...; serving ...]" (EOF if it dies first)
    while (line := process.stdout.readline()) and not line.startswith("[compiled in"):
        startup.append(line)
    deadline = time.time() + 300
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health").json()["status"] == "ready":
                break
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.5)
    yield port, startup
    process.terminate()
    process.wait(timeout=30)


def _on(port: int, text: str) -> str:
    assert "127.0.0.1:8000" in text, "the examples talk to the README's port"
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


@pytest.mark.parametrize("script", blocks("bash server"), ids=lambda script: script.split()[0])
def test_shell_block_against_the_server(script, server):
    done = subprocess.run(["bash", "-e", "-c", _on(server[0], script)], capture_output=True, text=True, timeout=120,
                          env=os.environ)
    assert done.returncode == 0, done.stderr
    assert '"error"' not in done.stdout, done.stdout  # e.g. a model name the server does not serve
    assert '"content"' in done.stdout and done.stdout.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("code", blocks("python server"), ids=lambda code: code.splitlines()[0][:40])
def test_python_block_against_the_server(code, server, capsys):
    exec(compile(_on(server[0], code), "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()


def test_the_server_says_what_it_compiles(server):
    # --warmup-tokens 16: one prefill chunk shape, then decode for each window of the bundled model's 2,048 positions.
    assert re.fullmatch(r"\[compile 1/5\] prefill chunk 16 \(window 256\) \.\.\. \d+\.\ds.*\n", server[1][-5])
    for i, window in enumerate((256, 512, 1024, 2048), 2):
        assert re.fullmatch(rf"\[compile {i}/5\] decode window {window} \.\.\. \d+\.\ds.*\n", server[1][i - 6])
