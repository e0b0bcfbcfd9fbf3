#!/usr/bin/env python
"""What a constraint (SamplingParams json_schema / regex) costs per token: each constrained request against an
unconstrained one of the same prompt, seed and length, run just after it.

A pair decodes the same number of tokens (the unconstrained request is cut at the constrained one's length,
stop tokens off), so both run the same decode blocks, the last one as full as the other's: the difference is
what the constraint adds to each token (llguidance's masks and the calls that carry them), not how a short
answer fills its last block. The pairs of a round run back to back, a fraction of a second apart, so the load of
a shared machine, which drifts over seconds, weighs on both alike. Rates are Usage.decode_tokens_per_s (tokens
after the first over the time after the first: prefill is not counted). Printed per case: the medians of the
constrained and the unconstrained rates, and the median over pairs of their ratio.

    python scripts/bench_constraints.py                     # bundled model, decode_steps 4 and 1
    python scripts/bench_constraints.py --decode-steps 4 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import qwen3moe_jax as qj

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "tags"]}
CASES = {"json_schema": {"json_schema": SCHEMA}, "regex": {"regex": r"[a-z_]+(\.[a-z_]+)*\(\)"}}
PROMPT = "import os\n"
MIN_TOKENS = 8  # a rate over fewer tokens is noise: such pairs are left out


def measure(model: qj.Model, seeds: int, rounds: int, max_new_tokens: int) -> dict[str, dict]:
    pairs: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    tokens: dict[str, int] = dict.fromkeys(CASES, 0)
    for extra in CASES.values():  # warm-up: compile and build the matchers' tokenizer once
        model.complete(PROMPT, sampling=qj.SamplingParams(max_new_tokens=8, **extra))
    for _ in range(rounds):
        for seed in range(seeds):
            for case, extra in CASES.items():
                sampling = qj.SamplingParams(temperature=1.0, seed=seed, max_new_tokens=max_new_tokens)
                constrained = model.complete(PROMPT, sampling=dataclasses.replace(sampling, **extra))
                n = len(constrained.token_ids)
                tokens[case] += n
                if n <= MIN_TOKENS:
                    continue
                free = model.complete(PROMPT, n, sampling, stop_token_ids=())
                pairs[case].append((constrained.usage.decode_tokens_per_s, free.usage.decode_tokens_per_s))

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")  # every request too short to time

    return {case: {"tokens_per_s": median([c for c, _ in p]), "unconstrained_tokens_per_s": median([f for _, f in p]),
                   "vs_unconstrained": median([c / f for c, f in p]), "pairs": len(p), "tokens": tokens[case]}
            for case, p in pairs.items()}


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
            print(f"  {case:12s} {r['tokens_per_s']:7.1f} tokens/s, unconstrained "
                  f"{r['unconstrained_tokens_per_s']:7.1f}: {r['vs_unconstrained']:.2f}x  ({r['pairs']} pairs, "
                  f"{r['tokens']} constrained tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
