"""Determinism check (SAM-1, SAM-2): the same greedy and seeded requests, run several times in one
process and in fresh processes, must give the same tokens on the same backend.

    python scripts/determinism.py --preset tiny --runs 3 --processes 2
    python -m qwen3moe_jax.tools.determinism --model FILE.gguf

Each fresh process is `python -m qwen3moe_jax.tools.determinism --worker` with the same model arguments;
it prints its tokens as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from qwen3moe_jax.api import Model
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.tools.cli import add_model_args, build_model

REQUESTS = {
    "greedy": SamplingParams(stop_token_ids=()),
    "seeded": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1234, stop_token_ids=()),
    "seeded, penalty": SamplingParams(temperature=1.0, repeat_penalty=1.2, repeat_last_n=32, seed=7,
                                      stop_token_ids=()),
}
TEXT_PROMPTS = ["def fibonacci(n):", "The capital of France is"]


def run_requests(model: Model, new_tokens: int) -> dict[str, list[list[int]]]:
    """Every request of REQUESTS on every prompt: {request name: [token ids per prompt]}."""
    prompts = [model.encode(p) for p in TEXT_PROMPTS] if model.tokenizer else [[1, 2, 3, 4], [7, 7, 7]]
    return {name: [model.generate(p, new_tokens, sampling) for p in prompts] for name, sampling in REQUESTS.items()}


def check(model_args: list[str], runs: int, processes: int, new_tokens: int) -> dict[str, Any]:
    """Run REQUESTS `runs` times here and once in each of `processes` fresh processes."""
    model = build_model(_parser().parse_args(model_args))
    in_process = [run_requests(model, new_tokens) for _ in range(runs)]
    command = [sys.executable, "-m", "qwen3moe_jax.tools.determinism", "--worker", "--new-tokens", str(new_tokens),
               *model_args]
    in_processes = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                    for _ in range(processes)]
    reference = in_process[0]
    return {
        "tokens": reference,
        "in_process_match": {name: all(r[name] == reference[name] for r in in_process) for name in REQUESTS},
        "cross_process_match": {name: all(r[name] == reference[name] for r in in_processes) for name in REQUESTS},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--runs", type=int, default=3, help="repeats in this process")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes, one run each")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_requests(build_model(args), args.new_tokens)))
        return 0
    report = check(_model_argv(args), args.runs, args.processes, args.new_tokens)
    runs, processes = f"same in {args.runs} runs", f"same in {args.processes} processes"
    print(f"{'request':<16} {runs:>16} {processes:>20}  first tokens")
    for name in REQUESTS:
        print(f"{name:<16} {_yes(report['in_process_match'][name]):>16} {_yes(report['cross_process_match'][name]):>20}"
              f"  {report['tokens'][name][0][:8]}")
    deterministic = all(report["in_process_match"].values()) and all(report["cross_process_match"].values())
    print("deterministic" if deterministic else "NOT deterministic")
    return 0 if deterministic else 1


def _model_argv(args: argparse.Namespace) -> list[str]:
    """The arguments that build the model, for the worker processes."""
    argv = ["--model", args.model] if args.model else ["--preset", args.preset]
    argv += ["--dtype", args.dtype, "--init-seed", str(args.init_seed)]
    return argv + (["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else [])


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    sys.exit(main())
