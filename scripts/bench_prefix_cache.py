#!/usr/bin/env python
"""What the prefix cache saves an agent: time to first token, turn by turn, of a 6-turn tool-using conversation
served with and without it (issue 33).

The conversation is a coding agent's: a system prompt of about 2,000 tokens with 8 tool schemas (rendered by the
chat template), a task, then turns that each append the assistant's tool call and the tool's output (a file, test
logs, a diff), and a last user message. Every turn sends the whole conversation again, as agents do. The
assistant turns are scripted (random weights write nothing worth continuing); each request's own reply (greedy, or
seeded on turns 3 and 5; 16 tokens with logprobs) is what is compared.

For each model, a random checkpoint is written as a Hugging Face directory (`qj.save_hf`) and served twice at
once, `qwen3moe-jax serve --model DIR --max-seq-len 4096 --warmup-tokens 4096` with and without
`--no-prefix-cache` (every prefill shape compiled before the first turn); each turn goes to the server without the
cache, then to the one with it, so both meet the same load of a shared machine. Time to first token is measured
at the client, from sending the request to the first streamed chunk that carries a token (its logprobs); the
script checks that both servers send the same tokens and logprobs, and that `cached_tokens` says what was reused.

Models (float32, the bundled model's tokenizer and chat template, 4,096 positions):
  bundled-like  the bundled model's shape: 4 layers, hidden 256, 16 experts of 128, top 2
  30b-reduced   Qwen3-30B-A3B's layer shape (hidden 2048, 32 q / 4 kv heads of 128, expert FFN 768, top 8) cut to
                2 layers and 32 experts, vocabulary the bundled one's 4,096 (2 CPU cores could not hold or run
                more in minutes)

    python scripts/bench_prefix_cache.py                      # both models, a table per model (medians of 3)
    python scripts/bench_prefix_cache.py --models bundled-like --rounds 5 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx
except ImportError as err:  # not in the base install
    raise SystemExit(f"{err}: this script needs the HTTP clients, pip install 'qwen3moe-jax[client]' "
                     "(or -e '.[client]' in a checkout)") from None

import qwen3moe_jax as qj

CONTEXT = 4096
MODELS = {
    "bundled-like": {},
    "30b-reduced": dict(hidden_size=2048, num_layers=2, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=32,
                        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144),
}
NO_THINKING = {"enable_thinking": False}


def write_checkpoint(name: str, directory: Path) -> None:
    """A random checkpoint at the model's shape, with the bundled model's tokenizer, as a Hugging Face directory."""
    bundled = qj.load(progress=False)
    config = bundled.config.replace(max_position_embeddings=CONTEXT, **MODELS[name])
    model = qj.random_model(config, std=0.02, seed=0, max_seq_len=256)
    model.tokenizer = bundled.tokenizer
    qj.save_hf(model, directory)


# ------------------------------------------------------------------------------------------ the conversation


def _tool(name: str, summary: str, params: dict[str, tuple[str, str]]) -> dict:
    properties = {key: {"type": kind, "description": text} for key, (kind, text) in params.items()}
    return {"type": "function", "function": {"name": name, "description": summary, "parameters": {
        "type": "object", "properties": properties, "required": list(params), "additionalProperties": False}}}


TOOLS = [
    _tool("read_file", "Read a text file of the repository and return its content with line numbers. Use it before "
          "editing a file, and read only the lines you need when a file is long.",
          {"path": ("string", "the file's path, relative to the repository root"),
           "start_line": ("integer", "the first line to return, counting from 1"),
           "end_line": ("integer", "the last line to return; omit it to read to the end of the file")}),
    _tool("write_file", "Write a whole file, creating it or replacing its content. Prefer apply_patch for changes to "
          "an existing file: it keeps the rest of the file as it is.",
          {"path": ("string", "the file's path, relative to the repository root"),
           "content": ("string", "the file's new content, complete")}),
    _tool("apply_patch", "Apply a unified diff to files of the repository. The diff's context lines must match the "
          "files exactly; on a mismatch nothing is changed and the hunks that failed are returned.",
          {"patch": ("string", "the diff, with --- and +++ headers and @@ hunks"),
           "check_only": ("boolean", "only report whether the diff applies, changing nothing")}),
    _tool("run_tests", "Run the project's tests with pytest and return the summary and the failures' tracebacks. "
          "Run the narrowest selection that covers your change; the whole suite takes minutes.",
          {"selection": ("string", "test files, test names or -k expressions, as pytest takes them"),
           "timeout_s": ("integer", "stop the run after this many seconds")}),
    _tool("search_code", "Search the repository for a regular expression and return matching lines with their "
          "file and line number, at most 50 of them.",
          {"pattern": ("string", "a Python regular expression"),
           "glob": ("string", "only files whose path matches this glob, e.g. 'src/**/*.py'")}),
    _tool("list_dir", "List a directory of the repository: names, sizes and whether each entry is a folder.",
          {"path": ("string", "the directory, relative to the repository root"),
           "depth": ("integer", "how many levels of subfolders to list")}),
    _tool("run_shell", "Run a shell command in the repository root and return its exit status and output. Never "
          "run commands that change files outside the repository or that reach the network.",
          {"command": ("string", "the command line"),
           "timeout_s": ("integer", "stop the command after this many seconds")}),
    _tool("git_diff", "Show the changes of the working tree against a commit, as a unified diff.",
          {"base": ("string", "the commit to compare against, e.g. HEAD"),
           "paths": ("string", "only these paths, separated by spaces")}),
]

RULES = [
    "Read the code you are about to change before you change it, and follow the style of the file you edit.",
    "Make the smallest change that solves the task; do not rename or reformat what the task does not touch.",
    "Every behaviour you add or fix comes with a test that fails without your change and passes with it.",
    "Run the tests that cover your change before you say you are done, and report what you ran and its result.",
    "Never weaken or delete a test to make it pass; if a test is wrong, say why and fix the test itself.",
    "Errors must tell the user what went wrong and what to do; raise the project's own exception types.",
    "Keep functions short and named for what they do; comments say why, not what the code already says.",
    "Do not add dependencies; the standard library and the packages already in pyproject.toml are enough.",
    "When a command fails, read its output before you try again; do not repeat a command that cannot succeed.",
    "Write type hints on public functions and keep them accurate; run the linter on the files you touched.",
    "Prefer plain data structures and pure functions; keep state in one place and pass it explicitly.",
    "When you are unsure what the user wants, ask one precise question instead of guessing.",
]
SYSTEM = ("You are a coding agent working in a Python repository on the user's machine. You can read and change "
          "files, search the code, run the tests and shell commands through the tools below. Work step by step: "
          "look at the relevant code, make a plan, change the code, run the tests, and report.\n\n"
          "Rules:\n" + "\n".join(f"{i}. {rule}" for i, rule in enumerate(RULES * 2, 1)))


def _source(functions: int) -> str:
    """A Python file's text, of about `functions` small functions (what a tool returns)."""
    return "\n\n".join(f"def scale_{i}(values: list[float], factor: float = {i}.5) -> list[float]:\n"
                       f"    \"\"\"Each value times factor, plus {i}.\"\"\"\n"
                       f"    return [v * factor + {i} for v in values]" for i in range(functions))


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def conversation() -> list[list[dict]]:
    """The messages of each of the 6 turns: each turn's are the previous turn's and what happened since."""
    turns = [[{"role": "system", "content": SYSTEM},
              {"role": "user", "content": "The test test_scale_rounds in tests/test_scale.py fails since yesterday. "
                                          "Find out why and fix it."}]]
    steps = [
        (_call("read_file", {"path": "src/scale.py"}), _source(6)),
        (_call("run_tests", {"selection": "tests/test_scale.py"}),
         "FAILED tests/test_scale.py::test_scale_rounds - AssertionError: assert [1.5, 3.0] == [1.0, 3.0]\n"
         + "\n".join(f"tests/test_scale.py:{40 + i}: in test_scale_rounds\n    assert scale_{i}([1.0, 2.0]) == "
                     f"[{i}.0, {2 * i}.0]" for i in range(6)) + "\n1 failed, 23 passed in 0.84s"),
        (_call("apply_patch", {"patch": "--- a/src/scale.py\n+++ b/src/scale.py\n@@ -1,3 +1,3 @@\n-def scale_0("
                                        "values: list[float], factor: float = 0.5)\n+def scale_0(values: list[float]"
                                        ", factor: float = 1.0)\n"}),
         "Applied 1 hunk to src/scale.py."),
        (_call("run_tests", {"selection": "tests/test_scale.py"}), "24 passed in 0.79s"),
    ]
    for call, output in steps:
        turns.append(turns[-1] + [call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                                         "content": output}])
    turns.append(turns[-1] + [{"role": "assistant", "content": "The default factor of scale_0 was 0.5 since "
                                                                "yesterday's change; I set it back to 1.0 and the "
                                                                "tests pass."},
                              {"role": "user", "content": "Thanks. Add a test that pins the default factor."}])
    return turns


# ---------------------------------------------------------------------------------------------- the servers


def start_server(directory: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="bench-prefix-cache-", suffix=".log")[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3moe_jax", "serve", "--model", str(directory), "--max-seq-len", str(CONTEXT),
         "--warmup-tokens", str(CONTEXT), "--port", str(port), "--served-model-name", "m", *flags],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.time() + 1800
    while True:
        try:
            if httpx.get(f"{url}/health").json()["status"] == "ready":
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(1)


def ask(url: str, messages: list[dict], turn: int) -> dict:
    """One streamed turn: time to the first token, the tokens' logprobs, and the usage."""
    sampling = {"temperature": 0.7, "seed": turn} if turn in (3, 5) else {"temperature": 0}
    body = {"model": "m", "messages": messages, "tools": TOOLS, "max_tokens": 16, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}, "chat_template_kwargs": NO_THINKING, **sampling}
    start, first, tokens, usage = time.perf_counter(), None, [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                if choice.get("logprobs"):
                    first = first or time.perf_counter()
                    tokens += [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]
            usage = chunk.get("usage") or usage
    return {"ttft_s": first - start, "tokens": tokens, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def run_round(name: str, directory: Path) -> list[dict]:
    """The conversation once, over a fresh pair of servers (a fresh prefix cache)."""
    servers = {}
    try:
        # One after the other: the second reads the programs the first compiled from JAX's persistent cache.
        for mode, flags in (("cold", ("--no-prefix-cache",)), ("cached", ())):
            print(f"[{name}: starting the {mode} server, which compiles first]", file=sys.stderr, flush=True)
            servers[mode] = start_server(directory, *flags)
            wait_ready(*servers[mode])
        rows = []
        for turn, messages in enumerate(conversation(), 1):
            cold = ask(servers["cold"][1], messages, turn)
            cached = ask(servers["cached"][1], messages, turn)
            if cold["tokens"] != cached["tokens"]:
                raise SystemExit(f"turn {turn}: the servers' tokens differ:\n{cold['tokens']}\n{cached['tokens']}")
            row = {"turn": turn, "prompt_tokens": cold["prompt_tokens"], "cached_tokens": cached["cached_tokens"],
                   "cold_ttft_s": cold["ttft_s"], "cached_ttft_s": cached["ttft_s"],
                   "ratio": cached["ttft_s"] / cold["ttft_s"], "same_tokens": True}
            print(f"[{name} turn {turn}: {row['prompt_tokens']} prompt tokens, {row['cached_tokens']} reused, time to "
                  f"first token {row['cold_ttft_s']:.2f} s -> {row['cached_ttft_s']:.2f} s ({row['ratio']:.2f}x)]",
                  file=sys.stderr, flush=True)
            rows.append(row)
        return rows
    finally:
        for process, _, log in servers.values():
            process.terminate()
            process.wait(timeout=60)
            log.unlink()


def run_model(name: str, workdir: Path, rounds: int) -> list[dict]:
    """Each turn's figures, the medians over `rounds` rounds (a shared machine's load moves single runs by up to
    2x), with every round's ratio kept."""
    directory = workdir / name
    if not (directory / "config.json").exists():
        print(f"[{name}: writing the random checkpoint]", file=sys.stderr, flush=True)
        write_checkpoint(name, directory)
    runs = [run_round(name, directory) for _ in range(rounds)]
    return [{**turns[0], **{key: statistics.median(t[key] for t in turns)
                            for key in ("cold_ttft_s", "cached_ttft_s", "ratio")},
             "ratios": [t["ratio"] for t in turns]} for turns in zip(*runs, strict=True)]


def table(rows: list[dict]) -> str:
    lines = ["| turn | prompt tokens | reused (cached_tokens) | TTFT without cache | TTFT with cache | with / without |"
             " each round | same tokens and logprobs |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    lines += [f"| {r['turn']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | {r['cold_ttft_s']:.2f} s | "
              f"{r['cached_ttft_s']:.2f} s | {r['ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} | "
              f"{'yes' if r['same_tokens'] else 'no'} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    p.add_argument("--workdir", help="where the checkpoints are written (kept, and reused when there); default: a "
                                     "temporary folder")
    p.add_argument("--rounds", type=int, default=3, help="conversations over fresh servers; the table gives each "
                                                           "turn's medians (default 3)")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--markdown", help="write the tables here too")
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        results = {name: run_model(name, workdir, args.rounds) for name in args.models.split(",")}
    text = "\n\n".join(f"{name}:\n\n{table(rows)}" for name, rows in results.items())
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
