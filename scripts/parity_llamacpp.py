#!/usr/bin/env python
"""Compare qwen3moe_jax with llama.cpp (llama-cpp-python) on one GGUF file, CPU is fine.

Prints, per prompt: whether both tokenize it alike, the max |logit error| at the last prompt position,
where 32-token greedy continuations first differ, and along llama.cpp's greedy path the mean |logit error|
and the share of steps where our argmax is llama.cpp's token. With quantized weights llama.cpp's CPU
kernels also quantize activations, so expect errors of ~1e-2 there (~1e-5 for F32 files).

    python scripts/parity_llamacpp.py --model model.gguf        # or set QWEN3_MOE_GGUF_PATH
"""

import argparse
import json
import os
import sys

from qwen3moe_jax import llamacpp
from qwen3moe_jax.parity import compare_with_llamacpp

PROMPTS = [
    "def fibonacci(n):\n    ",
    "混合专家模型把每个词元发送给",
    "<|im_start|>user\nWrite a haiku about experts.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QWEN3_MOE_GGUF_PATH"),
                        help="GGUF file (default: $QWEN3_MOE_GGUF_PATH)")
    parser.add_argument("--prompt", action="append", help="a prompt text (repeatable; default: four built in)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="our dtype: float32 (exact comparison) or bfloat16")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set QWEN3_MOE_GGUF_PATH")
    if not llamacpp.available():
        sys.exit(llamacpp.MISSING_REASON)

    rows = compare_with_llamacpp(args.model, args.prompt or PROMPTS, args.new_tokens, args.dtype)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print(f"{'prompt':<24} {'tokens':>6} {'same ids':>8} {'last max|err|':>13} {'path mean|err|':>14} "
          f"{'argmax agree':>12} {'greedy diverges at':>18}")
    for row in rows:
        div = row["greedy_first_divergence"]
        print(f"{row['prompt'][:24]!r:<24} {row['prompt_tokens']:>6} {str(row['tokens_match']):>8} "
              f"{row['last_max_abs_logit_error']:>13.2e} {row['path_mean_abs_logit_error']:>14.2e} "
              f"{row['path_argmax_agreement']:>12.0%} {'never' if div is None else div:>18}")


if __name__ == "__main__":
    main()
