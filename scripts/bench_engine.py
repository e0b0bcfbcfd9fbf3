#!/usr/bin/env python
"""How the engine's two knobs pay off, each measured against its own baseline in the same run.

1. decode_steps: greedy float32 decode tokens/s of one request through Model.generate for k decode steps per
   device call (default k = 1, 2, 4, 8), at the issue-19 CPU shape (vocab 8192, hidden 512, 6 layers, 16
   experts top 4, expert FFN 256, 8 q / 2 kv heads of 64) unless --preset/--model is given.
2. prefill_chunk: time to the first token of prompts of several lengths for each chunk size (a chunk at least
   the prompt's length is one pass), on the same model.

    python scripts/bench_engine.py                      # the issue-19 shape
    python scripts/bench_engine.py --model bundled      # the bundled model (256-token context)
    python scripts/bench_engine.py --preset small --chunks 64,128,256,512 --prompt-lengths 256,1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import qwen3moe_jax as qj

ISSUE_SHAPE = dict(vocab_size=8192, hidden_size=512, num_layers=6, num_experts=16, num_experts_per_tok=4,
                   moe_intermediate_size=256, num_heads=8, num_kv_heads=2, head_dim=64, mlp_only_layers=(),
                   intermediate_size=1024, max_position_embeddings=4096)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _model(args: argparse.Namespace, **engine_args) -> qj.Model:
    if args.model == "bundled":
        return qj.load(progress=False, **engine_args)
    config = qj.preset(args.preset) if args.preset else qj.preset("small").replace(**ISSUE_SHAPE)
    return qj.random_model(config, std=0.2, max_seq_len=args.max_seq_len, **engine_args)


def decode_rate(model: qj.Model, prompt: list[int], tokens: int, repeats: int) -> float:
    sampling = qj.SamplingParams(max_new_tokens=tokens, stop_token_ids=())
    model.generate(prompt, sampling=sampling)  # compile
    rates = [model.complete(prompt, sampling=sampling).usage.decode_tokens_per_s for _ in range(repeats)]
    return statistics.median(rates)


def first_token_s(model: qj.Model, prompt: list[int], repeats: int) -> float:
    sampling = qj.SamplingParams(max_new_tokens=1, stop_token_ids=())
    model.generate(prompt, sampling=sampling)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, sampling=sampling)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bundled"], help="the bundled model instead of random weights")
    p.add_argument("--preset", help="random weights at a preset's shape instead of the issue-19 shape")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--steps", type=_ints, default=[1, 2, 4, 8], help="decode_steps values")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--chunks", type=_ints, default=[], help="prefill_chunk values (empty: skip part 2)")
    p.add_argument("--prompt-lengths", type=_ints, default=[200])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()

    result: dict = {"decode_tokens_per_s": {}, "first_token_s": {}}
    base = _model(args)
    prompt = np.random.default_rng(0).integers(0, base.config.vocab_size, 32).tolist()
    for k in args.steps:
        model = qj.Model(base.config, base.params, None, base.max_seq_len, decode_steps=k)
        rate = decode_rate(model, prompt, args.decode_tokens, args.repeats)
        result["decode_tokens_per_s"][k] = rate
        first = result["decode_tokens_per_s"][args.steps[0]]
        print(f"decode_steps {k}: {rate:7.1f} tokens/s ({rate / first:.2f}x decode_steps {args.steps[0]})",
              flush=True)
    for n in args.prompt_lengths:
        ids = np.random.default_rng(n).integers(0, base.config.vocab_size, n).tolist()
        for chunk in args.chunks:
            # The repeats send one prompt: without the prefix cache, each prefills it whole, as a new prompt.
            model = qj.Model(base.config, base.params, None, base.max_seq_len, prefill_chunk=chunk, prefix_cache=False)
            seconds = first_token_s(model, ids, args.repeats)
            result["first_token_s"].setdefault(n, {})[chunk] = seconds
            print(f"prompt {n}, prefill_chunk {chunk}: first token in {seconds * 1e3:7.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
