"""Greedy tokens an int8 KV cache keeps against the float32 cache on the bundled model, over many prompts: snippets of
the held-out standard-library files the model never trained on (tests/model/test_kv_int8.py measures the same on
twelve hand-written prompts). Each prompt's two greedy continuations are compared position by position (a token
after a divergence counts as kept only where the two texts happen to agree again) and up to the first divergence.

    python scripts/kv_int8_drift.py [--prompts 388] [--seed 7] [--cache int8 | int8-unrotated | bfloat16]

--cache int8-unrotated runs the int8 cache without its key rotation (the cache before it had one); bfloat16 keeps a
float32 cache whose keys and values are rounded to bfloat16 as they are written: the drift any cache rounding gives.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.model import transformer
from qwen3moe_jax.tools.training import corpus_files, is_held_out


def held_out_prompts(model: qj.Model, count: int, seed: int, length: int = 24) -> list[list[int]]:
    """`count` prompts of `length` tokens, each from a held-out file (in turn) at a position drawn from seed."""
    files = [text for rel, text in corpus_files(Path(sysconfig.get_paths()["stdlib"])) if is_held_out(rel)]
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        ids = model.encode(files[i % len(files)])
        start = int(rng.integers(0, max(1, len(ids) - 64)))
        prompts.append(ids[start : start + length])
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=388)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--cache", choices=["int8", "int8-unrotated", "bfloat16"], default="int8")
    args = p.parse_args()

    model = qj.load(progress=False, max_seq_len=256)
    prompts = held_out_prompts(model, args.prompts, args.seed)
    n = args.new_tokens
    reference = [model.generate(ids, n, stop_token_ids=[]) for ids in prompts]
    # The variants are traced in after the reference ran, its compiled steps dropped.
    if args.cache == "int8-unrotated":
        transformer.rotate_keys = lambda x: x
    if args.cache == "bfloat16":
        write = transformer.write_cache
        transformer.write_cache = lambda cache, new, start: write(
            cache, new.astype(jnp.bfloat16).astype(new.dtype) if new.ndim == 4 else new, start)
    jax.clear_caches()
    other = qj.load(progress=False, max_seq_len=256, kv_dtype="model" if args.cache == "bfloat16" else "int8")
    equal = kept = diverged = 0
    for ids, ours in zip(prompts, reference, strict=True):
        theirs = other.generate(ids, n, stop_token_ids=[])
        equal += sum(a == b for a, b in zip(ours, theirs, strict=True))
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), n)
        kept, diverged = kept + first, diverged + (first < n)
    total = n * len(prompts)
    print(f"{args.cache} cache against the float32 cache, bundled model, {len(prompts)} held-out prompts x {n} greedy "
          f"tokens: {equal / total:.1%} of tokens equal position by position, {kept / total:.1%} before the first "
          f"divergence; {diverged} of {len(prompts)} continuations differ")


if __name__ == "__main__":
    main()
