"""The sparse MoE block: the router picks each token's k experts, the chosen experts' SwiGLU outputs are summed
with the router's weights; on a mesh, per device over the experts it holds. Which expert kernel runs
(moe_kernels.py, pallas_moe.py) is chosen here, per compiled shape."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model import backend, cpu_kernels
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.matmul import einsum
from qwen3moe_jax.model.moe_kernels import (
    experts_swiglu_blocked,
    experts_swiglu_cpu,
    experts_swiglu_gather,
    experts_swiglu_ragged,
)
from qwen3moe_jax.model.params import MOE_AXES, MoEParams
from qwen3moe_jax.model.quant import QuantizedWeight
from qwen3moe_jax.model.sharding import logical_spec, mesh_sizes

Array = jax.Array


def route(router: Array, x: Array, config: ModelConfig) -> tuple[Array, Array, Array]:
    """Router: softmax over all experts in f32, keep the top k, renormalise if the config says so.

    x: [N, E]. Returns (weights [N, k] in x's dtype, expert ids [N, k], router logits [N, experts] in f32).
    """
    logits = einsum("ne,ex->nx", x, router).astype(jnp.float32)
    weights, experts = top_k_routing(logits, config)
    return weights.astype(x.dtype), experts, logits


def top_k_routing(logits: Array, config: ModelConfig) -> tuple[Array, Array]:
    """f32 router logits [..., experts] -> (weights [..., k], expert ids [..., k]), best first."""
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def moe(p: MoEParams, x: Array, config: ModelConfig) -> tuple[Array, Array]:
    """Sparse MoE block: each token's k chosen SwiGLU experts, summed with the router weights.
    Returns the output [B, T, E] and the router logits [B, T, experts].

    On a mesh whose expert or tensor axis splits the expert weights, the block runs per device under
    shard_map: each device routes its tokens, runs them through the experts (and the slice of FFN width)
    it holds, and a psum over those axes adds the partial outputs up. No device reads another's experts.
    """
    sizes = mesh_sizes()
    weight_specs = MoEParams(**{
        name: jax.tree.map(lambda a, axes=axes: logical_spec(axes, a.shape, sizes), getattr(p, name))
        for name, axes in MOE_AXES.items()
    })
    expert_axis, _, ffn_axis = logical_spec(MOE_AXES["gate"], p.gate.shape, sizes)
    if expert_axis is None and ffn_axis is None:  # one device, or a mesh that replicates the experts
        return moe_local(p, x, config)
    x_spec = logical_spec(("batch", "seq", "embed"), x.shape, sizes)

    def per_device(p: MoEParams, x: Array) -> tuple[Array, Array]:
        first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * p.gate.shape[0]
        out, logits = moe_local(p, x, config, first_expert=first)
        # Partial sums: over the experts other devices hold, and over FFN width other devices hold.
        return jax.lax.psum(out, tuple(a for a in (expert_axis, ffn_axis) if a)), logits

    return jax.shard_map(per_device, in_specs=(weight_specs, x_spec), out_specs=(x_spec, x_spec),
                         check_vma=False)(p, x)


def moe_local(p: MoEParams, x: Array, config: ModelConfig, first_expert: Array | int = 0) -> tuple[Array, Array]:
    """The MoE block over the experts p holds: experts first_expert .. first_expert + len(p.gate) - 1 of the
    router's (all of them on one device). Pairs routed to other experts contribute nothing here.

    The kernel is config.moe_kernel (MOE_KERNELS, resolved by choose_moe_kernel). "gather" multiplies each
    (token, expert) pair by its expert's weights; the grouped kernels sort the N*k pairs by expert, so each
    expert's weights multiply one contiguous run of rows and no per-pair copy of expert weights is made.
    """
    B, T, E = x.shape
    k = config.num_experts_per_tok
    held = p.gate.shape[0]
    flat = x.reshape(B * T, E)
    weights, experts, router_logits = route(p.router, flat, config)

    pair_expert = experts.reshape(-1) - first_expert  # [N*k], local expert ids
    # Pairs for experts held elsewhere get id `held`: they sort last, outside every group, and come out zero.
    pair_expert = jnp.where((pair_expert >= 0) & (pair_expert < held), pair_expert, held)
    kernel = choose_moe_kernel(config.moe_kernel, pair_expert.shape[0], held, p.gate)
    if kernel in ("gather", "cpu"):
        pair_rows = jnp.repeat(flat, k, axis=0)
        if kernel == "cpu":
            out_rows = experts_swiglu_cpu(p, pair_rows, pair_expert)
        else:
            out_rows = experts_swiglu_gather(p, pair_rows, pair_expert)
        return _combine(out_rows, weights, x.dtype).reshape(B, T, E), router_logits.reshape(B, T, -1)
    order = jnp.argsort(pair_expert, stable=True)
    pair_token = order // k
    group_sizes = jnp.bincount(pair_expert, length=held).astype(jnp.int32)
    out_rows = experts_swiglu(p, flat[pair_token], pair_expert[order], group_sizes, kernel)
    # Back to (token, rank) order and summed over each token's k pairs in a fixed order: a scatter-add's order
    # (atomics on GPU) could depend on the other tokens of the batch, and a request's tokens must not.
    unsorted = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return _combine(out_rows[unsorted], weights, x.dtype).reshape(B, T, E), router_logits.reshape(B, T, -1)


def _combine(pair_rows: Array, weights: Array, dtype: Any) -> Array:
    """Each token's k expert outputs (pair_rows [N*k, E] in (token, rank) order) weighted by weights [N, k] and
    summed in a fixed order, in float32 with one rounding to `dtype`."""
    N, k = weights.shape
    weighted = pair_rows.astype(jnp.float32).reshape(N, k, -1) * weights.astype(jnp.float32)[:, :, None]
    return jnp.sum(weighted, axis=1).astype(dtype)


# The MoE expert kernels (ModelConfig.moe_kernel: `load(moe_kernel=...)`, `--moe-kernel`), all exact:
# - "gather": each (token, expert) pair multiplies its expert's weights, gathered per pair. Reads only the chosen
#   experts, but copies one expert's matrices per pair: for few rows (decode).
# - "blocked": pairs sorted by expert, each expert's run padded to whole blocks of b rows, one batched matmul
#   over the blocks (b = 1 at decode, so only the chosen experts are read). Temporary memory grows with the rows.
# - "ragged": lax.ragged_dot, the grouped GEMM of backends that have one (TPU). XLA:GPU (jax 0.9-0.11) lowers
#   it to a dense batched dot over ALL experts (tokens x experts x FFN), XLA:CPU to a loop over all experts.
# - "pallas": a Pallas grouped matmul over the blocked form's blocks that reads each block's expert weights in
#   place (float, int8 or int4), no gathered copy (pallas_moe.py): Triton on GPU, Pallas' interpreter elsewhere
#   (slow: for tests).
# - "cpu": each pair's SwiGLU by a C++ kernel called through XLA's FFI that reads the chosen experts' float32
#   weights in place (cpu_kernels.py, built by cpu_kernels.build): the CPU backend's decode kernel.
# "auto" picks per compiled shape from the platform traced for (backend.py), the number of pairs and the weights;
# see choose_moe_kernel.
MOE_KERNELS = ("auto", "gather", "blocked", "ragged", "pallas", "cpu")


def check_moe_kernel(name: str, dtype: Any = None) -> str:
    """name, if it is one of MOE_KERNELS (and reads weights of `dtype`, when given); else a ConfigError."""
    if name not in MOE_KERNELS:
        raise ConfigError(f"moe_kernel must be one of {', '.join(MOE_KERNELS)}, got {name!r}")
    if name == "cpu" and dtype is not None:
        if np.dtype(dtype) != np.float32 or backend.platform() != "cpu":
            raise ConfigError("moe_kernel 'cpu' multiplies float32 expert weights on the CPU backend: use 'auto' "
                              f"or 'gather' (here dtype {np.dtype(dtype).name}, backend {backend.platform()})")
        if (reason := cpu_kernels.build(quiet=True)) is not None:  # refused, so no "XLA's ops run instead" warning
            raise ConfigError(f"moe_kernel 'cpu' cannot run here: {reason}")
    return name


def choose_moe_kernel(name: str, pairs: int, experts: int, weights: Any = None) -> str:
    """The kernel `name` stands for at `pairs` (token, expert) pairs over `experts` experts (static shapes: chosen
    once per compiled shape) whose weights are like `weights` (one expert matrix stack, when known). "auto" is
    ragged_dot where it is native (TPU); elsewhere, while the pairs are no more than the experts (decode), the
    per-pair kernels: "cpu" for float32 weights on the CPU backend where it could be compiled, else the gather
    (it reads as many expert matrices as blocked does with b = 1, without the sort and scatter); then the blocked
    form (prefill: whole blocks per expert, never tokens x experts). On a GPU, int4 experts take "pallas" at every
    size: it reads the packed weights in place, where XLA writes the blocked form's dequantized blocks out before
    its matmuls (found by compiling for an H100: `qwen3moe-jax aot`; XLA's own GEMM fusions read int8 in place)."""
    if check_moe_kernel(name) != "auto":
        return name
    target = backend.platform()
    if target == "tpu":
        return "ragged"
    if target == "gpu" and isinstance(weights, QuantizedWeight) and weights.bits == 4:
        return "pallas"
    if pairs > experts:
        return "blocked"
    float32 = isinstance(weights, jax.Array | jax.ShapeDtypeStruct) and weights.dtype == jnp.float32
    return "cpu" if target == "cpu" and float32 and cpu_kernels.available() else "gather"


def experts_swiglu(p: MoEParams, rows: Array, row_expert: Array, group_sizes: Array, kernel: str = "auto") -> Array:
    """SwiGLU of rows [M, E] sorted by expert, by a grouped kernel of MOE_KERNELS ("auto" as choose_moe_kernel
    says; "gather" runs as "blocked", which for sorted rows reads the same weights)."""
    kernel = choose_moe_kernel(kernel, rows.shape[0], group_sizes.shape[0])
    if kernel == "ragged":
        return experts_swiglu_ragged(p, rows, row_expert, group_sizes)
    if kernel == "pallas":
        from qwen3moe_jax.model.pallas_moe import experts_swiglu_pallas  # Pallas loads only for this kernel

        return experts_swiglu_pallas(p, rows, row_expert, group_sizes)
    return experts_swiglu_blocked(p, rows, row_expert, group_sizes)
