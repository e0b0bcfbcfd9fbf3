#!/usr/bin/env python
"""Check qwen3moe_jax on one checkpoint against a greedy baseline: a saved one (scripts/greedy_baseline.py)
or one built now by transformers (Hugging Face directory, f32) or llama.cpp (GGUF file).

Prints, per prompt: whether we tokenize its text to the baseline's ids, where our greedy continuation first
leaves the baseline's ("never" when identical), and along the baseline's greedy path the max and mean
|logit error| over the full vocabulary and the share of steps our argmax takes its token. With quantized
GGUF weights llama.cpp's CPU kernels also quantize activations, so expect errors of ~1e-2 there (~1e-5 for
F32 files).

    python scripts/parity_check.py --model model.gguf --against llama.cpp    # or set QWEN3_MOE_GGUF_PATH
    python scripts/parity_check.py --model DIR --against transformers --random-prompts 3
    python scripts/parity_check.py --model DIR --against hf.json --dtype bfloat16
"""

import argparse
import json
import os
import sys
from pathlib import Path

import qwen3moe_jax as qj
from qwen3moe_jax.api import DTYPES
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.tools.parity import Baseline, add_prompt_args, check_against_baseline, choose_prompts, make_baseline

IMPLEMENTATIONS = ("transformers", "llama.cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QWEN3_MOE_GGUF_PATH"),
                        help="GGUF file or Hugging Face directory (default: $QWEN3_MOE_GGUF_PATH)")
    parser.add_argument("--against", required=True, metavar="BASELINE.json|transformers|llama.cpp",
                        help="a saved baseline, or the implementation to build one with now")
    add_prompt_args(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="what ours computes in")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set QWEN3_MOE_GGUF_PATH")
    building = args.against in IMPLEMENTATIONS
    if not building and not Path(args.against).is_file():
        parser.error(f"--against takes a baseline JSON file, transformers or llama.cpp; {args.against!r} is none")
    if not building and (args.prompt or args.random_prompts):
        parser.error("a saved baseline brings its own prompts; prompt flags go with --against transformers/llama.cpp")
    if args.against == "llama.cpp" and not llamacpp.available():
        sys.exit(llamacpp.MISSING_REASON)

    try:
        if building:
            prompts = choose_prompts(args.model, args.prompt, args.random_prompts, args.prompt_len)
            baseline = make_baseline(args.against, args.model, prompts, args.new_tokens, progress=True)
        else:
            baseline = Baseline.load(args.against)
        # Loaded after the reference is gone, so the two never hold a large model's memory together.
        model = qj.load(args.model, dtype=args.dtype, max_seq_len=baseline.max_positions, progress=not args.json)
        rows = check_against_baseline(model, baseline)
    except qj.Qwen3MoeError as err:
        sys.exit(f"error: {err}")
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print(f"ours ({args.dtype}) against {baseline.source}: {baseline.model}, {baseline.new_tokens} greedy tokens")
    print(f"{'prompt':<28} {'tokens':>6} {'same ids':>8} {'greedy diverges at':>18} {'max |logit err|':>15} "
          f"{'mean |logit err|':>16} {'argmax agree':>12}")
    for row in rows:
        div = row["greedy_first_divergence"]
        same = "-" if row["same_ids"] is None else str(row["same_ids"])
        print(f"{row['prompt'][:26]!r:<28} {row['prompt_tokens']:>6} {same:>8} {'never' if div is None else div:>18} "
              f"{row['max_abs_logit_error']:>15.2e} {row['mean_abs_logit_error']:>16.2e} "
              f"{row['argmax_agreement']:>12.0%}")


if __name__ == "__main__":
    main()
