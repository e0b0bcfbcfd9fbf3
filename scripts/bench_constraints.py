#!/usr/bin/env python
"""What a constraint (SamplingParams json_schema / regex) costs per token, against unconstrained decoding of
the same prompts with the same settings, measured in the same run.

Each round runs every case once per seed, interleaved (so a busy machine slows all alike), and takes the
decode tokens/s of each request (Usage.decode_tokens_per_s: tokens after the first over the time after the
first, so prefill is not counted). Printed: the median per case over rounds and its ratio to unconstrained.

    python scripts/bench_constraints.py                     # bundled model, decode_steps 4 and 1
    python scripts/bench_constraints.py --decode-steps 4 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import qwen3moe_jax as qj

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "tags"]}
CASES = {"unconstrained": {}, "json_schema": {"json_schema": SCHEMA}, "regex": {"regex": r"[a-z_]+(\.[a-z_]+)*\(\)"}}


def measure(model: qj.Model, seeds: int, rounds: int, max_new_tokens: int) -> dict[str, dict]:
    rates: dict[str, list[float]] = {case: [] for case in CASES}
    tokens: dict[str, int] = dict.fromkeys(CASES, 0)
    for extra in CASES.values():  # warm-up: compile and build the matchers' tokenizer once
        model.complete("import os\n", sampling=qj.SamplingParams(max_new_tokens=8, **extra))
    for _ in range(rounds):
        for seed in range(seeds):
            for case, extra in CASES.items():
                sampling = qj.SamplingParams(temperature=1.0, seed=seed, max_new_tokens=max_new_tokens, **extra)
                done = model.complete("import os\n", sampling=sampling)
                if len(done.token_ids) > 8:  # a rate over a handful of tokens is noise
                    rates[case].append(done.usage.decode_tokens_per_s)
                tokens[case] += len(done.token_ids)
    base = statistics.median(rates["unconstrained"])
    return {case: {"tokens_per_s": statistics.median(r), "vs_unconstrained": statistics.median(r) / base,
                   "requests": len(r), "tokens": tokens[case]} for case, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-steps", default="4,1", help="comma-separated decode_steps to measure")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = {}
    for steps in (int(s) for s in args.decode_steps.split(",")):
        model = qj.load(decode_steps=steps, progress=False)
        results[steps] = measure(model, args.seeds, args.rounds, args.max_new_tokens)
        print(f"bundled model, decode_steps {steps}, temperature 1, {args.seeds} seeds x {args.rounds} rounds")
        for case, r in results[steps].items():
            print(f"  {case:14s} {r['tokens_per_s']:7.1f} tokens/s  {r['vs_unconstrained']:.2f}x  "
                  f"({r['requests']} requests, {r['tokens']} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
