#!/usr/bin/env python
"""Expert parallelism, two ways, on one MoE block: the library's form against a routed (all-to-all) form.

- simple (model.moe, what the library runs): every device along the `expert` axis sees all tokens, runs
  the pairs routed to the experts it holds, and a psum over the axis adds the partial outputs.
- routed: the tokens are split over the `expert` axis; each device routes its share and sends every
  (token, expert) pair to the device holding that expert with an all_to_all, which runs them and sends the
  results back (a second all_to_all); the outputs are gathered again for the (replicated) residual stream.
  Buffers are sized for the worst case (all of a device's pairs to one device) so no token is dropped.

Both give the same output (checked here); the script times them per step size. On CPU it simulates
`--devices` devices (XLA_FLAGS), which measures the compute and the copies but not a real interconnect.

    python scripts/bench_expert_parallel.py --preset small --expert 8
    python scripts/bench_expert_parallel.py --preset qwen3-30b-a3b --expert 8 --dtype bfloat16   # 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--devices" in sys.argv:  # CPU devices must be asked for before jax starts
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count="
                          f"{sys.argv[sys.argv.index('--devices') + 1]}")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import qwen3moe_jax as qj
from qwen3moe_jax.model.moe import experts_swiglu, moe, route
from qwen3moe_jax.model.params import MOE_AXES, MoEParams
from qwen3moe_jax.model.sharding import logical_spec, place, use_mesh


def routed_moe(p: MoEParams, x: jax.Array, config: qj.ModelConfig, sizes: dict[str, int]) -> jax.Array:
    """The MoE block with tokens sent to their experts' devices; x [N, E] with N divisible by the expert axis."""
    specs = MoEParams(**{n: logical_spec(a, getattr(p, n).shape, sizes) for n, a in MOE_AXES.items()})
    ffn_axis = specs.gate[2]
    ep = sizes["expert"]

    def per_device(p: MoEParams, x: jax.Array) -> jax.Array:
        n, E = x.shape
        held = p.gate.shape[0]
        weights, experts, _ = route(p.router, x, config)
        pairs = n * config.num_experts_per_tok
        dest, local = (experts // held).reshape(-1), (experts % held).reshape(-1)
        token = jnp.arange(pairs) // config.num_experts_per_tok
        # Each pair's slot in its destination's buffer: how many earlier pairs go to the same device.
        onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
        slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dest[:, None], axis=1)[:, 0]
        send = jnp.zeros((ep, pairs, E), x.dtype).at[dest, slot].set(x[token])
        send_id = jnp.full((ep, pairs), held, jnp.int32).at[dest, slot].set(local)  # `held`: an empty slot
        rows = jax.lax.all_to_all(send, "expert", 0, 0).reshape(ep * pairs, E)
        row_expert = jax.lax.all_to_all(send_id, "expert", 0, 0).reshape(-1)
        order = jnp.argsort(row_expert, stable=True)
        group_sizes = jnp.bincount(row_expert, length=held).astype(jnp.int32)
        done = experts_swiglu(p, rows[order], row_expert[order], group_sizes)
        done = jnp.zeros_like(done).at[order].set(done).reshape(ep, pairs, E)
        back = jax.lax.all_to_all(done, "expert", 0, 0)  # back[d]: the results of what this device sent to d
        out = jnp.zeros_like(x).at[token].add(back[dest, slot] * weights.reshape(-1)[:, None])
        return jax.lax.psum(out, ffn_axis) if ffn_axis else out

    return jax.shard_map(per_device, in_specs=(specs, P("expert", None)), out_specs=P("expert", None),
                         check_vma=False)(p, x)


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--expert", type=int, default=8, help="expert-axis size")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-axis size")
    parser.add_argument("--tokens", default="8,64,512,2048", help="tokens per step (multiples of --expert)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--devices", type=int, help="simulated CPU devices (default: the real ones)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    config = qj.preset(args.preset)
    mesh = qj.make_mesh(expert=args.expert, tensor=args.tensor)
    sizes = dict(mesh.shape)
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    weights = {name: (rng.standard_normal(shape, np.float32) * 0.05).astype(dtype) for name, shape in
               {"router": (config.hidden_size, config.num_experts),
                "gate": (config.num_experts, config.hidden_size, config.moe_intermediate_size),
                "up": (config.num_experts, config.hidden_size, config.moe_intermediate_size),
                "down": (config.num_experts, config.moe_intermediate_size, config.hidden_size)}.items()}
    p = MoEParams(**{name: place(w, MOE_AXES[name], mesh) for name, w in weights.items()})

    simple = jax.jit(lambda p, x: moe(p, x[None], config)[0][0])
    routed = jax.jit(lambda p, x: routed_moe(p, x, config, sizes))
    print(f"{args.preset} MoE block, {config.num_experts} experts (top {config.num_experts_per_tok}), "
          f"mesh {sizes}, {args.dtype}, {jax.devices()[0].platform}")
    print(f"{'tokens':>7} {'simple ms':>10} {'routed ms':>10} {'routed/simple':>14} {'max |diff|':>11}")
    results = {}
    for n in (int(t) for t in args.tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((n, config.hidden_size), np.float32).astype(dtype))
        with use_mesh(mesh):
            diff = float(jnp.max(jnp.abs(simple(p, x).astype(jnp.float32) - routed(p, x).astype(jnp.float32))))
            t_simple = median_seconds(simple, p, x, repeats=args.repeats)
            t_routed = median_seconds(routed, p, x, repeats=args.repeats)
        results[n] = {"simple_s": t_simple, "routed_s": t_routed, "max_abs_diff": diff}
        print(f"{n:>7} {t_simple * 1e3:>10.2f} {t_routed * 1e3:>10.2f} {t_routed / t_simple:>14.2f} {diff:>11.2e}")
    return results


if __name__ == "__main__":
    main()
