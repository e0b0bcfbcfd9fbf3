#!/usr/bin/env python
"""Write a greedy baseline: per prompt, its token ids, the greedy continuation one implementation produces
(EOS ignored) and that implementation's f32 logits along it. scripts/parity_check.py checks a model
against it later, on another machine or after a change.

    python scripts/greedy_baseline.py --model DIR --source transformers --random-prompts 3 --out hf.json
    python scripts/greedy_baseline.py --model model.gguf --source llama.cpp --out llamacpp.json

The JSON holds all but the logits, which go to an .npz of the same stem beside it.
"""

import argparse
import os
import sys

import qwen3moe_jax as qj
from qwen3moe_jax.api import DTYPES
from qwen3moe_jax.tools.parity import SOURCES, add_prompt_args, choose_prompts, make_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QWEN3_MOE_GGUF_PATH"),
                        help="GGUF file or Hugging Face directory (default: $QWEN3_MOE_GGUF_PATH)")
    parser.add_argument("--source", choices=SOURCES, default="ours", help="the implementation that runs it")
    add_prompt_args(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="what ours or transformers compute in (llama.cpp runs the file's own types)")
    parser.add_argument("--out", required=True, help="baseline JSON to write (the logits go beside it as .npz)")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set QWEN3_MOE_GGUF_PATH")

    try:
        prompts = choose_prompts(args.model, args.prompt, args.random_prompts, args.prompt_len)
        baseline = make_baseline(args.source, args.model, prompts, args.new_tokens, args.dtype, progress=True)
        npz = baseline.save(args.out)
    except qj.Qwen3MoeError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out} (prompts, ids, greedy tokens) and {npz} (path logits), from {baseline.model}")


if __name__ == "__main__":
    main()
