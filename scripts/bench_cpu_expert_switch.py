#!/usr/bin/env python
"""An experiment toward issue 19.3 (greedy f32 decode on 2 CPU cores): the whole batch-1 decode step with the
package's MoE kernel against the same step whose MoE multiplies the chosen experts in place, printing each one's
p10 / median time over interleaved rounds in one process:

    python scripts/bench_cpu_expert_switch.py

XLA:CPU copies the chosen experts' weights before multiplying them whenever they are picked by a gather or a dynamic
slice (benchmarks/cpu-2core-llamacpp-decode-2026-11-26-2.md). Here each expert's matrices are separate arrays (made
once, beside the model's stacked weights: this doubles the experts' memory, fine for an experiment), and each
(token, expert) pair runs a `lax.switch` over the experts, whose branches multiply a parameter as it lies. "switch"
keeps gate and up apart (three dots a pair), "switch_gateup" concatenates them per expert (two). The step is
bench_llamacpp_decode.py's shape: forward over every layer with the package's attention (the cache written
and returned), lm_head, argmax.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.cache import KVCache
from qwen3moe_jax.model import _combine, attention, lm_logits, moe, rms_norm, route

sys.path.insert(0, str(Path(__file__).parent))  # the shape is bench_llamacpp_decode.py's, however this is run
from bench_llamacpp_decode import SHAPE  # noqa: E402


def per_expert(layer, concat_gate_up: bool) -> dict:
    """A layer's experts as separate arrays: {"gate_up" or "gate"/"up": [X arrays], "down": [X arrays]}."""
    mlp, X = layer.mlp, layer.mlp.gate.shape[0]
    out = {"down": [mlp.down[i] for i in range(X)]}
    if concat_gate_up:
        out["gate_up"] = [jnp.concatenate([mlp.gate[i], mlp.up[i]], axis=1) for i in range(X)]
    else:
        out["gate"], out["up"] = [mlp.gate[i] for i in range(X)], [mlp.up[i] for i in range(X)]
    return out


def moe_switch(router, experts: dict, y, c: qj.ModelConfig):
    """The MoE block of one token, each of its k pairs a lax.switch over the experts' own arrays."""
    flat = y.reshape(1, -1)
    weights, chosen, _ = route(router, flat, c)
    F = c.moe_intermediate_size

    def branch(i: int):
        def run(row, e):
            if "gate_up" in e:
                gate_up = row @ e["gate_up"][i]
                h = jax.nn.silu(gate_up[:, :F]) * gate_up[:, F:]
            else:
                h = jax.nn.silu(row @ e["gate"][i]) * (row @ e["up"][i])
            return h @ e["down"][i]
        return run

    branches = [branch(i) for i in range(c.num_experts)]
    rows = [jax.lax.switch(chosen[0, j], branches, flat, experts) for j in range(c.num_experts_per_tok)]
    return _combine(jnp.concatenate(rows), weights, y.dtype).reshape(y.shape)


def make_step(c: qj.ModelConfig, kind: str, window: int):
    position = jnp.array([[window // 2]], jnp.int32)

    def step(params, experts, token, cache):
        x = params.embed[token]
        keys, values = [], []
        for i, layer in enumerate(params.layers):
            h, k_i, v_i = attention(layer.attn, rms_norm(x, layer.attn_norm, c.rms_norm_eps), position, cache.k[i],
                                cache.v[i], c, window)
            x = x + h
            y = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            x = x + (moe(layer.mlp, y, c)[0] if kind == "package" else moe_switch(layer.mlp.router, experts[i], y, c))
            keys.append(k_i)
            values.append(v_i)
        # The cache comes out too, so that its writes are part of the step as in decoding.
        token = jnp.argmax(lm_logits(params, rms_norm(x, params.final_norm, c.rms_norm_eps))[:, 0], axis=-1)
        return token, KVCache(k=keys, v=values)

    return jax.jit(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--moe-kernel", default="gather", help="the package's kernel to compare against")
    args = parser.parse_args()
    c = SHAPE.replace(moe_kernel=args.moe_kernel)
    params = qj.random_model(c, "float32", seed=0, std=0.05, max_seq_len=512).params
    cache = KVCache.init(c, 1, 256, jnp.float32)
    token = jnp.array([[5]], jnp.int32)
    variants = {
        f"package ({args.moe_kernel})": (make_step(c, "package", 256), None),
        "switch": (make_step(c, "switch", 256), [per_expert(layer, False) for layer in params.layers]),
        "switch_gateup": (make_step(c, "switch", 256), [per_expert(layer, True) for layer in params.layers]),
    }
    tokens = {name: int(step(params, experts, token, cache)[0][0]) for name, (step, experts) in variants.items()}
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"the variants disagree on the greedy token: {tokens}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (step, experts) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params, experts, token, cache))
            times[name].append(time.perf_counter() - start)
    base = np.median(times[f"package ({args.moe_kernel})"])
    print(f"whole batch-1 decode step, {args.rounds} interleaved rounds (same greedy token {tokens.popitem()[1]}):")
    for name, t in times.items():
        ms = np.array(t) * 1e3
        print(f"  {name:20s} p10 {np.percentile(ms, 10):6.3f} ms  median {np.median(ms):6.3f} ms  "
              f"{np.median(t) / base:.2f}x the package's median")


if __name__ == "__main__":
    main()
