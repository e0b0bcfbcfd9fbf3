#!/usr/bin/env python
"""What sampling costs per token, against greedy decoding measured in the same run.

1. The sampler alone on one row of logits (default: Qwen's 151,936-token vocabulary): argmax (the
   baseline), then `sample` with greedy, temperature-only and full (penalty + temperature + top-k +
   top-p) settings, and the same full pipeline with the top-k/top-p cut-offs found by sorting instead
   of by binary search, for comparison.
2. End to end: decode tokens/s of a model for a greedy and a sampled request (same compiled step). A
   preset is given the same vocabulary size as part 1, so the sampler works on rows of real length.

    python scripts/bench_sampling.py --preset small
    python scripts/bench_sampling.py --preset qwen3-30b-a3b --layers 4 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.runtime.sampling import SamplerState, penalize_repeats, sample

FULL = qj.SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repeat_penalty=1.1, repeat_last_n=64, seed=1)
SETTINGS = {"greedy": qj.SamplingParams(), "temperature": qj.SamplingParams(temperature=0.8, seed=1), "full": FULL}


def sorted_filter(logits, state, history, length):
    """The full pipeline with the cut-offs read off a sorted copy of the vocabulary (the usual way)."""
    logits = penalize_repeats(logits, history, length, state.repeat_penalty, state.repeat_last_n)
    logits = logits / state.temperature[:, None]
    descending = -jnp.sort(-logits, axis=-1)
    logits = jnp.where(logits < descending[:, state.top_k[0] - 1][:, None], -jnp.inf, logits)
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < state.top_p[:, None], axis=-1)
    logits = jnp.where(logits < jnp.take_along_axis(descending, kept[:, None] - 1, axis=-1), -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(state.key[0], length[0]), logits[0])[None]


def time_call(fn, *args, repeats: int) -> float:
    """Median seconds per call of a jitted fn (compiled first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_sampler(vocab: int, repeats: int) -> None:
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, vocab)).astype(np.float32) * 3)
    history = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (1, 4096)), jnp.int32)
    length = jnp.asarray([512], jnp.int32)
    baseline = time_call(jax.jit(lambda x: jnp.argmax(x, axis=-1)), logits, repeats=repeats)
    rows = [("argmax (baseline)", baseline)]
    for name, params in SETTINGS.items():
        state = SamplerState.from_params([params])
        rows.append((f"sample, {name}", time_call(jax.jit(sample), logits, state, history, length, repeats=repeats)))
    by_sorting = time_call(jax.jit(sorted_filter), logits, SamplerState.from_params([FULL]), history, length,
                           repeats=repeats)
    rows.append(("full, cut-offs by sorting", by_sorting))
    print(f"sampler alone, one row of {vocab} logits, {jax.devices()[0].platform}:")
    for name, seconds in rows:
        print(f"  {name:<28} {seconds * 1e6:10.1f} us  {seconds / baseline:8.1f}x argmax")


def bench_decode(model: qj.Model, prompt_len: int, new_tokens: int) -> None:
    prompt = list(range(1, prompt_len + 1))
    model.engine.warmup(prompt_len, new_tokens)
    rates = {}
    for name, params in SETTINGS.items():
        best = 0.0
        for _ in range(3):
            usage = model.complete(prompt, new_tokens, params, stop_token_ids=()).usage
            best = max(best, usage.decode_tokens_per_s)
        rates[name] = best
    print(f"decode, {new_tokens} tokens after a {prompt_len}-token prompt (best of 3):")
    for name, rate in rates.items():
        print(f"  {name:<12} {rate:9.1f} tokens/s  {1e3 / rate:8.2f} ms/token  "
              f"{(1 / rate - 1 / rates['greedy']) * 1e6:+8.0f} us/token vs greedy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (also given to --preset)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--preset", default="small", help="model shape for the end-to-end part (configs/)")
    parser.add_argument("--model", help="a checkpoint instead of --preset")
    parser.add_argument("--layers", type=int, help="keep only this many layers of the preset")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    bench_sampler(args.vocab, args.repeats)
    max_len = args.prompt_len + args.new_tokens
    if args.model:
        model = qj.load(args.model, dtype=args.dtype, max_seq_len=max_len)
    else:
        config = qj.preset(args.preset).replace(vocab_size=args.vocab)
        if args.layers:
            config = config.replace(num_layers=args.layers)
        model = qj.random_model(config, args.dtype, max_seq_len=max_len, std=0.02)
    bench_decode(model, args.prompt_len, args.new_tokens)


if __name__ == "__main__":
    main()
