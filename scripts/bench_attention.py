"""Attention in blocks (model/transformer.attend: batch-invariant at every window) against the flat softmax over the
whole window it replaced, measured in one process, interleaved: the attention op alone at decode shapes, then the
bundled model's decode through the Engine with each formulation traced in.

    python scripts/bench_attention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.model import transformer


def flat_attend(q, keys, values, positions, scale):
    """The formulation before blocks: one softmax over the window, normalised before the values are summed."""
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, precision=precision) * scale
    visible = jnp.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, values, precision=precision)


def op_microseconds(attend, q, k, v, positions, calls: int = 50, repeats: int = 7) -> float:
    step = jax.jit(attend, static_argnums=4)
    jax.block_until_ready(step(q, k, v, positions, 0.1))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = step(q, k, v, positions, 0.1)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def decode_tokens_per_s(attend, batch: int, prompt: int = 100, tokens: int = 64, repeats: int = 5) -> float:
    """The bundled model's Engine decoding `tokens` per row after a prompt, with `attend` traced into its steps."""
    transformer.attend = attend  # read when the steps are traced: a fresh model traces them anew
    engine = qj.load(progress=False, max_batch=batch).engine
    engine.prefill(None, [[1] * prompt] * batch, [0] * batch, [prompt] * batch)
    jax.block_until_ready(engine.decode([prompt] * batch, [True] * batch).token)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(tokens // engine.decode_steps):
            out = engine.decode([prompt + i * engine.decode_steps] * batch, [True] * batch)
        jax.block_until_ready(out.token)
        best = min(best, time.perf_counter() - start)
    return batch * tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    blocked = transformer.attend
    config = qj.load(progress=False).config
    rng = np.random.default_rng(0)
    print(f"attention op, bundled model's heads (kv {config.num_kv_heads}, q per kv {config.q_per_kv}, head_dim "
          f"{config.head_dim}), one decode token per row, best of 7 x 50 calls:")
    for batch, window in [(1, 256), (4, 256), (1, 1024), (4, 4096)]:
        shape = (batch, config.num_kv_heads, window, config.head_dim)
        q = jnp.asarray(rng.standard_normal((batch, 1, config.num_kv_heads, config.q_per_kv, config.head_dim)),
                        jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
        positions = jnp.full((batch, 1), window - 5)
        flat, blocks = (op_microseconds(f, q, k, v, positions) for f in (flat_attend, blocked))
        print(f"  {batch} rows, window {window:>5}: flat {flat:7.1f} us, blocks {blocks:7.1f} us, "
              f"blocks / flat {blocks / flat:.2f}")
    print("bundled model, Engine decode after a 100-token prompt, tokens/s (best of 5 x 64 tokens):")
    for round_ in range(1, args.rounds + 1):
        for batch in (1, 4):
            flat, blocks = decode_tokens_per_s(flat_attend, batch), decode_tokens_per_s(blocked, batch)
            print(f"  round {round_}, batch {batch}: flat {flat:,.0f}, blocks {blocks:,.0f}, "
                  f"blocks / flat {blocks / flat:.2f}")
    transformer.attend = blocked


if __name__ == "__main__":
    main()
