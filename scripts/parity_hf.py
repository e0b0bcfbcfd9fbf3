#!/usr/bin/env python
"""Compare qwen3moe_jax with Hugging Face transformers on one checkpoint directory (f32, CPU is fine).

Prints, per prompt, the max |logit error| and the first position where 32-token greedy outputs differ.
"""

import argparse
import json

import numpy as np

from qwen3moe_jax.parity import compare_with_transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--prompts", type=int, default=3, help="number of random prompts")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    vocab = json.load(open(f"{args.model}/config.json"))["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.prompts)]
    rows = compare_with_transformers(args.model, prompts, args.new_tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'prompt':>6} {'tokens':>6} {'max |logit err|':>16} {'greedy diverges at':>19}")
    for i, row in enumerate(rows):
        div = row["greedy_first_divergence"]
        print(f"{i:>6} {row['prompt_tokens']:>6} {row['max_abs_logit_error']:>16.2e} "
              f"{'never' if div is None else div:>19}")


if __name__ == "__main__":
    main()
