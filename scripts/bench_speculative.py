#!/usr/bin/env python
"""Speculative decoding (prompt lookup) against plain decoding with the default settings, per kind of prompt: an
edit of given code (its continuation copies the code), free text, sampled text, and structured output.

Both models are loaded in this process and run the same request, round after round: in each round each model runs
it `--repeats` times in a row (the best rate counts: the run least disturbed by other jobs), in alternating order,
so the load of a shared machine weighs on both alike. Rates are Usage.decode_tokens_per_s (tokens after the first
over the time after the first: prefill is not counted); the table gives the median over rounds of each, the median
of the per-round ratios and their range, and the share of drafted tokens kept. It also checks that both produce the
same tokens, and that each model's repeats do.

    python scripts/bench_speculative.py                      # bundled model, 9 rounds
    python scripts/bench_speculative.py --rounds 15 --draft-tokens 7 --ngram 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import qwen3moe_jax as qj

FUNCTION = '''def parse_header(line, lower=True):
    """Split an HTTP header line into its name and value."""
    name, sep, value = line.partition(":")
    if not sep:
        raise ValueError("not a header line: %r" % (line,))
    name = name.strip()
    if lower:
        name = name.lower()
    return name, value.strip()
'''
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"]}
# A listing whose continuation repeats it, as an edit of given code does: the bundled model (4 layers) does not
# copy a function it was shown, but it does go on with a repetitive listing.
LISTING = "".join(f"        self.{name} = {name}\n" for name in ("host", "port", "user", "password", "timeout"))
# (prompt, sampling): the kinds of prompt the issue names.
CASES = {
    "repeats earlier text": ("class Connection:\n    def __init__(self, host, port, user, password, timeout):\n"
                             + LISTING + "\n    def reset(self, host, port, user, password, timeout):\n" + LISTING
                             + "\n    def update(self, host, port, user, password, timeout):\n", dict()),
    "code edit (a function, then its first line again)": (
        FUNCTION + "\n\n# The same function, with `lower` renamed:\n"
        + FUNCTION.split("\n")[0].replace("lower", "casefold") + "\n", dict()),
    "free text (greedy)": ("The configuration file is read once at start-up. Each section names a service, and "
                           "each key sets one of its options; unknown keys are reported", dict()),
    "free text (sampled, T=0.8)": ("import os\nimport sys\n\n\ndef main(argv):\n", dict(temperature=0.8, seed=3)),
    "structured output (json_schema)": ("import json\n", dict(json_schema=SCHEMA, temperature=1.0, seed=1)),
}


def measure(plain: qj.Model, spec: qj.Model, rounds: int, repeats: int, max_new_tokens: int) -> dict[str, dict]:
    results = {}
    for name, (prompt, extra) in CASES.items():
        sampling = qj.SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(), **extra)
        for model in (plain, spec):  # compile
            model.complete(prompt, sampling=sampling)
        rates: dict[str, list[float]] = {"plain": [], "speculative": []}
        tokens: dict[str, list[int]] = {}
        counter = spec.scheduler.speculator
        drafted, accepted = counter.drafted_tokens, counter.accepted_tokens
        for i in range(rounds):
            # Every other round the speculative requests first: a drift in the machine's load weighs on both alike.
            for kind, model in (("plain", plain), ("speculative", spec))[:: -1 if i % 2 else 1]:
                done = [model.complete(prompt, sampling=sampling) for _ in range(repeats)]
                rates[kind].append(max(c.usage.decode_tokens_per_s for c in done))  # the best: the least disturbed
                assert all(c.token_ids == done[0].token_ids for c in done)
                tokens.setdefault(kind, done[0].token_ids)
        requests = rounds * repeats
        drafted, accepted = counter.drafted_tokens - drafted, counter.accepted_tokens - accepted
        results[name] = {
            "plain_tokens_per_s": statistics.median(rates["plain"]),
            "speculative_tokens_per_s": statistics.median(rates["speculative"]),
            "ratios": [s / p for p, s in zip(rates["plain"], rates["speculative"], strict=True)],
            "drafted_per_request": drafted / requests, "accepted_per_request": accepted / requests,
            "acceptance": accepted / drafted if drafted else float("nan"),
            "tokens": len(tokens["plain"]), "same_tokens": tokens["plain"] == tokens["speculative"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3, help="requests of each model per round; its best rate counts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=None, help="default: the library's")
    parser.add_argument("--ngram", type=int, default=None, help="default: the library's")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    options = {k: v for k, v in (("draft_tokens", args.draft_tokens), ("ngram", args.ngram)) if v is not None}
    plain = qj.load(progress=False)
    spec = qj.load(progress=False, speculative="ngram", **options)
    results = measure(plain, spec, args.rounds, args.repeats, args.max_new_tokens)
    print("| prompt | tokens | plain tokens/s | speculative tokens/s | speed-up | per round | drafted | accepted "
          "| acceptance | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        ratio = statistics.median(r["ratios"])
        print(f"| {name} | {r['tokens']} | {r['plain_tokens_per_s']:.0f} | {r['speculative_tokens_per_s']:.0f} | "
              f"{ratio:.2f}x | {min(r['ratios']):.2f}-{max(r['ratios']):.2f} | {r['drafted_per_request']:.0f} | "
              f"{r['accepted_per_request']:.0f} | {r['acceptance']:.0%} | {'yes' if r['same_tokens'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
