"""Qwen3-MoE as pure functions over a params pytree.

The math follows transformers' `modeling_qwen3_moe` and llama.cpp's `qwen3moe`:
  x = embed[tokens]
  per layer:  h = x + Attention(RMSNorm(x));  x = h + MoE-or-MLP(RMSNorm(h))
  logits = RMSNorm(x) @ lm_head          (lm_head = embed.T when the embeddings are tied)

Weights are stored input-major (`[in, out]`, heads kept as their own axis) so every projection is one
einsum. Every array dimension has a logical axis name (`vocab`, `embed`, `heads`, ...); the specs below
are the single description from which random init, checkpoint loading and sharding all derive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qwen3moe_jax import cpu_kernels
from qwen3moe_jax.cache import CACHE_AXES, KVCache
from qwen3moe_jax.config import ModelConfig
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.quant import INT4, QuantizedWeight, dequantize, host_param
from qwen3moe_jax.sharding import constrain, logical_spec, mesh_sizes, place

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one weight; `kind` says how a random init fills it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    kind: str = "matrix"  # "matrix": normal noise; "norm": ones


@struct.dataclass
class AttentionParams:
    q: Any  # [embed, heads, head_dim]
    k: Any  # [embed, kv_heads, head_dim]
    v: Any  # [embed, kv_heads, head_dim]
    o: Any  # [heads, head_dim, embed]
    q_norm: Any  # [head_dim]
    k_norm: Any  # [head_dim]


@struct.dataclass
class MoEParams:
    router: Any  # [embed, experts]
    gate: Any  # [experts, embed, expert_ffn]
    up: Any  # [experts, embed, expert_ffn]
    down: Any  # [experts, expert_ffn, embed]


# Logical axes of the MoE weights: param_specs declares them and the expert-parallel moe() shards by them.
# The router's expert axis has its own name so that it is never split: every device scores every expert.
MOE_AXES = {
    "router": ("embed", "router_experts"),
    "gate": ("experts", "embed", "expert_ffn"),
    "up": ("experts", "embed", "expert_ffn"),
    "down": ("experts", "expert_ffn", "embed"),
}


@struct.dataclass
class MLPParams:
    gate: Any  # [embed, ffn]
    up: Any  # [embed, ffn]
    down: Any  # [ffn, embed]


@struct.dataclass
class LayerParams:
    attn_norm: Any  # [embed]
    attn: AttentionParams
    mlp_norm: Any  # [embed]
    mlp: MoEParams | MLPParams


@struct.dataclass
class Params:
    embed: Any  # [vocab, embed]
    layers: list[LayerParams]
    final_norm: Any  # [embed]
    lm_head: Any  # [embed, vocab], or None when tied to `embed`


def param_specs(config: ModelConfig) -> Params:
    """The params pytree with a ParamSpec at every leaf."""
    c = config
    E, H, KV, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def layer(i: int) -> LayerParams:
        attn = AttentionParams(
            q=ParamSpec((E, H, D), ("embed", "heads", "head_dim")),
            k=ParamSpec((E, KV, D), ("embed", "kv_heads", "head_dim")),
            v=ParamSpec((E, KV, D), ("embed", "kv_heads", "head_dim")),
            o=ParamSpec((H, D, E), ("heads", "head_dim", "embed")),
            q_norm=ParamSpec((D,), ("head_dim",), "norm"),
            k_norm=ParamSpec((D,), ("head_dim",), "norm"),
        )
        if c.is_moe_layer(i):
            X, F = c.num_experts, c.moe_intermediate_size
            shapes = {"router": (E, X), "gate": (X, E, F), "up": (X, E, F), "down": (X, F, E)}
            mlp: MoEParams | MLPParams = MoEParams(**{n: ParamSpec(shapes[n], MOE_AXES[n]) for n in MOE_AXES})
        else:
            F = c.intermediate_size
            mlp = MLPParams(
                gate=ParamSpec((E, F), ("embed", "ffn")),
                up=ParamSpec((E, F), ("embed", "ffn")),
                down=ParamSpec((F, E), ("ffn", "embed")),
            )
        return LayerParams(
            attn_norm=ParamSpec((E,), ("embed",), "norm"),
            attn=attn,
            mlp_norm=ParamSpec((E,), ("embed",), "norm"),
            mlp=mlp,
        )

    return Params(
        embed=ParamSpec((c.vocab_size, E), ("vocab", "embed")),
        layers=[layer(i) for i in range(c.num_layers)],
        final_norm=ParamSpec((E,), ("embed",), "norm"),
        lm_head=None if c.tie_word_embeddings else ParamSpec((E, c.vocab_size), ("embed", "vocab")),
    )


def param_name(path: tuple) -> str:
    """Dotted name of a leaf in the params pytree, e.g. 'layers.3.attn.q'."""
    parts = []
    for key in path:
        parts.append(str(getattr(key, "name", getattr(key, "idx", getattr(key, "key", key)))))
    return ".".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """{dotted name: leaf} of a params pytree or its specs, in tree order (a QuantizedWeight is one leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, (ParamSpec, QuantizedWeight))
    )
    return {param_name(path): leaf for path, leaf in flat}


def init_params(
    config: ModelConfig, seed: int = 0, dtype: Any = jnp.float32, std: float = 0.02, mesh: Any = None
) -> Params:
    """Random weights (normal(0, std) matrices, unit norms): for tests, demos and benchmarks. dtype "int8"
    quantizes the matrices as loading does (quant.host_param); with a mesh, each tensor goes straight to its
    shards (sharding.py).

    Drawn by NumPy on the host, leaf by leaf: jax.random would compile a generator for every
    tensor shape, ~8 s for even the tiny preset on CPU, where this takes milliseconds.
    """
    specs = param_specs(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))

    def make(index: int, name: str, spec: ParamSpec) -> Any:
        if spec.kind == "norm":
            values = np.ones(spec.shape, np.float32)
        else:
            values = np.random.default_rng([seed, index]).standard_normal(spec.shape, np.float32) * np.float32(std)
        return place(host_param(name, spec.axes, values, dtype), spec.axes, mesh)

    return jax.tree_util.tree_unflatten(
        treedef, [make(i, param_name(path), spec) for i, (path, spec) in enumerate(leaves)]
    )


# ----------------------------------------------------------------------------------------------- math


def einsum(spec: str, x: Array, w: Array | QuantizedWeight) -> Array:
    """The one matmul of the model. f32 asks for full f32 precision, so parity runs are not TF32 on GPU.

    An int8 QuantizedWeight is contracted as stored, its values converted to x's dtype (exact: bfloat16
    holds every integer up to 256), which on GPU XLA fuses into the matmul's read of the int8 operand.
    The per-channel scale then multiplies the float32 result, exact because it is constant along the
    contracted axes, before the one rounding to x's dtype.

    An int4 weight's scales vary along the contracted axis, so they cannot wait for the output: the weight
    is dequantized as the matmul's operand (int4_operand).
    """
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    if not isinstance(w, QuantizedWeight) and not mesh_sizes() and (form := cpu_kernels.matmul_form(spec, x, w)):
        M, K, N = form  # a decode step's product on the CPU: the C++ kernel streams w faster than XLA's dot
        out_shape = jax.eval_shape(partial(jnp.einsum, spec), x, w).shape
        return cpu_matmul(x.reshape(M, K), w.reshape(K, N)).reshape(out_shape)
    if isinstance(w, QuantizedWeight) and w.bits == 4:
        w = int4_operand(w, x.dtype)
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x, w, precision=precision)
    y = jnp.einsum(spec, x, w.values.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)
    return (y * _scale_for_output(spec, w.scale)).astype(x.dtype)


def with_gradient_of(reference: Callable) -> Callable:
    """Decorator: the function's values with reference's derivatives. The C++ CPU kernels (cpu_kernels.py) have no
    derivatives of their own; reference computes the same thing with XLA's ops, so training can differentiate."""
    def wrap(kernel: Callable) -> Callable:
        differentiable = jax.custom_vjp(kernel)
        differentiable.defvjp(lambda *args: (kernel(*args), args),
                              lambda args, grad: jax.vjp(reference, *args)[1](grad))
        return differentiable
    return wrap


@with_gradient_of(lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST))
def cpu_matmul(x: Array, w: Array) -> Array:
    return cpu_kernels.matmul(x, w)


def int4_operand(w: QuantizedWeight, dtype: Any) -> Array:
    """An int4 weight as a matmul operand in `dtype`: unpacked and s * q - m per group computed in float32
    (an asymmetric group's s * q and m may nearly cancel, which bfloat16 arithmetic would magnify), rounded
    once to `dtype`. Elementwise ops and broadcasts only, for XLA:GPU to fuse into the consuming dot's operand
    read, so that only the packed bytes and the scales come from memory (scripts/int4_fusion_check.py reads
    the optimized HLO; not yet run on a GPU). XLA:CPU fuses nothing into a dot: there the dequantized weight
    (of a gathered expert block, for the experts) is written by a fusion of its own and read by the dot."""
    return dequantize(w).astype(dtype)


def _scale_for_output(spec: str, scale: Array) -> Array:
    """A QuantizedWeight's scale (the weight's axes, contracted ones of size 1) laid out to broadcast
    against the output of einsum `spec`, e.g. "bte,ehd->bthd": scale [1, H, D] -> [1, 1, H, D]."""
    inputs, out = spec.split("->")
    w_axes, out_axes = inputs.split(",")[1], out.removeprefix("...")  # "..." only leads, on x and out
    kept = [a for a in w_axes if a in out_axes]
    assert kept == [a for a in out_axes if a in kept], f"{spec}: the output must keep the weight's axis order"
    s = jnp.squeeze(scale, [i for i, a in enumerate(w_axes) if a not in kept])  # the contracted axes
    return jnp.expand_dims(s, [i for i, a in enumerate(out_axes) if a not in kept])


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in f32 and cast back before the weight multiply, as transformers does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in the rotate-half (NEOX) form. x: [B, T, heads, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(
    p: AttentionParams,
    x: Array,
    positions: Array,
    k_cache: Array,
    v_cache: Array,
    config: ModelConfig,
    window: int,
) -> tuple[Array, Array, Array]:
    """Causal GQA attention of x [B, T, E] at `positions` [B, T] over the cache [B, KV, S, D].

    The new keys and values are written into the cache at their positions first; a query at position
    p then attends to cache slots 0..p. Slots beyond p may hold stale or padding entries: the mask
    hides them, which is what lets one preallocated buffer serve every request and length.
    Only the first `window` slots are read (the caller guarantees every position is below it): a
    decode step early in a long cache then reads what is filled, not the whole buffer.
    """
    B, T, _ = x.shape
    eps = config.rms_norm_eps
    q = rms_norm(einsum("bte,ehd->bthd", x, p.q), p.q_norm, eps)
    k = rms_norm(einsum("bte,ehd->bthd", x, p.k), p.k_norm, eps)
    v = einsum("bte,ehd->bthd", x, p.v)
    q = rotary(q, positions, config.rope_theta)
    k = rotary(k, positions, config.rope_theta)

    start = positions[:, 0]
    # On a mesh the cache keeps its input sharding, so the donated buffer is reused step after step.
    k_cache = constrain(write_cache(k_cache, k.transpose(0, 2, 1, 3), start), CACHE_AXES)
    v_cache = constrain(write_cache(v_cache, v.transpose(0, 2, 1, 3), start), CACHE_AXES)

    keys, values = k_cache[:, :, :window], v_cache[:, :, :window]
    q = q.reshape(B, T, config.num_kv_heads, config.q_per_kv, config.head_dim)
    scores = einsum("btkgd,bksd->bkgts", q, keys) * (config.head_dim**-0.5)
    slots = jnp.arange(window)
    visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, window]
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = einsum("bkgts,bksd->btkgd", probs, values).reshape(B, T, config.num_heads, config.head_dim)
    return einsum("bthd,hde->bte", out, p.o), k_cache, v_cache


def write_cache(cache: Array, new: Array, start: Array) -> Array:
    """Write new [B, KV, T, D] into cache [B, KV, S, D] at slots start[b] .. start[b]+T-1 of each row.

    Slots at or past S are dropped, not clamped: the engine parks rows that must not change (free rows,
    rows part-way through their prompt) at position S, and a prompt's last chunk may run past the end."""
    B, _, T, _ = new.shape
    slots = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # [B, T]
    return cache.at[jnp.arange(B)[:, None], :, slots].set(new.transpose(0, 2, 1, 3), mode="drop")


def mlp(p: MLPParams, x: Array) -> Array:
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""
    h = jax.nn.silu(einsum("bte,ef->btf", x, p.gate)) * einsum("bte,ef->btf", x, p.up)
    return einsum("btf,fe->bte", h, p.down)


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
#   place, no gathered copy (pallas_moe.py): Triton on GPU, Pallas' interpreter elsewhere (slow: for tests).
# - "cpu": each pair's SwiGLU by a C++ kernel called through XLA's FFI that reads the chosen experts' float32
#   weights in place (cpu_kernels.py, compiled on first use): the CPU backend's decode kernel.
# "auto" picks per compiled shape from the backend, the number of pairs and the weights; see choose_moe_kernel.
MOE_KERNELS = ("auto", "gather", "blocked", "ragged", "pallas", "cpu")


def check_moe_kernel(name: str, dtype: Any = None) -> str:
    """name, if it is one of MOE_KERNELS (and reads weights of `dtype`, when given); else a ConfigError."""
    if name not in MOE_KERNELS:
        raise ConfigError(f"moe_kernel must be one of {', '.join(MOE_KERNELS)}, got {name!r}")
    if name == "pallas" and dtype is not None and np.dtype(dtype) == INT4:
        raise ConfigError("moe_kernel 'pallas' reads float and int8 expert weights, not int4: use 'auto', "
                          "'gather' or 'blocked' with dtype int4")
    if name == "cpu" and dtype is not None:
        if np.dtype(dtype) != np.float32 or jax.default_backend() != "cpu":
            raise ConfigError("moe_kernel 'cpu' multiplies float32 expert weights on the CPU backend: use 'auto' "
                              f"or 'gather' (here dtype {np.dtype(dtype).name}, backend {jax.default_backend()})")
        if (reason := cpu_kernels.why_unavailable()) is not None:  # refused, so no "XLA's ops run instead" warning
            raise ConfigError(f"moe_kernel 'cpu' cannot run here: {reason}")
    return name


def choose_moe_kernel(name: str, pairs: int, experts: int, weights: Any = None) -> str:
    """The kernel `name` stands for at `pairs` (token, expert) pairs over `experts` experts (static shapes: chosen
    once per compiled shape) whose weights are like `weights` (one expert matrix stack, when known). "auto" is
    ragged_dot where it is native (TPU); elsewhere, while the pairs are no more than the experts (decode), the
    per-pair kernels: "cpu" for float32 weights on the CPU backend where it could be compiled, else the gather
    (it reads as many expert matrices as blocked does with b = 1, without the sort and scatter); then the blocked
    form (prefill: whole blocks per expert, never tokens x experts)."""
    if check_moe_kernel(name) != "auto":
        return name
    backend = jax.default_backend()
    if backend == "tpu":
        return "ragged"
    if pairs > experts:
        return "blocked"
    float32 = isinstance(weights, jax.Array | jax.ShapeDtypeStruct) and weights.dtype == jnp.float32
    return "cpu" if backend == "cpu" and float32 and cpu_kernels.available() else "gather"


def experts_swiglu(p: MoEParams, rows: Array, row_expert: Array, group_sizes: Array, kernel: str = "auto") -> Array:
    """SwiGLU of rows [M, E] sorted by expert, by a grouped kernel of MOE_KERNELS ("auto" as choose_moe_kernel
    says; "gather" runs as "blocked", which for sorted rows reads the same weights)."""
    kernel = choose_moe_kernel(kernel, rows.shape[0], group_sizes.shape[0])
    if kernel == "ragged":
        return experts_swiglu_ragged(p, rows, row_expert, group_sizes)
    if kernel == "pallas":
        from qwen3moe_jax.pallas_moe import experts_swiglu_pallas  # Pallas loads only for this kernel

        return experts_swiglu_pallas(p, rows, row_expert, group_sizes)
    return experts_swiglu_blocked(p, rows, row_expert, group_sizes)


def experts_swiglu_gather(p: MoEParams, rows: Array, row_expert: Array) -> Array:
    """SwiGLU of each row [M, E] by its own expert's weights (row_expert [M], any order), gathered per row.
    Rows whose expert id is the number of experts (held by another device) come out zero. Indexing a
    QuantizedWeight gathers its values and scales alike."""
    held = p.gate.shape[0]
    expert = jnp.minimum(row_expert, held - 1)
    h = jax.nn.silu(einsum("me,mef->mf", rows, p.gate[expert])) * einsum("me,mef->mf", rows, p.up[expert])
    out = einsum("mf,mfe->me", h, p.down[expert])
    return jnp.where((row_expert < held)[:, None], out, 0)


@with_gradient_of(experts_swiglu_gather)
def experts_swiglu_cpu(p: MoEParams, rows: Array, row_expert: Array) -> Array:
    """The gather kernel's SwiGLU by the C++ "cpu" kernel, which reads the chosen experts' weights in place."""
    return cpu_kernels.experts_swiglu(p.gate, p.up, p.down, rows, row_expert)


def experts_swiglu_ragged(p: MoEParams, rows: Array, row_expert: Array, group_sizes: Array) -> Array:
    """SwiGLU of rows [M, E] sorted by expert (group_sizes [experts] rows each, row_expert [M] each row's
    expert), via lax.ragged_dot. Quantized weights as in `einsum`, each row scaled by its expert's scales.
    Rows past the groups (expert id = number of experts) come out zero, as ragged_dot defines."""
    precision = jax.lax.Precision.HIGHEST if rows.dtype == jnp.float32 else None

    def grouped(a: Array, w: Array | QuantizedWeight) -> Array:
        if isinstance(w, QuantizedWeight) and w.bits == 4:
            w = int4_operand(w, a.dtype)
        if not isinstance(w, QuantizedWeight):
            return jax.lax.ragged_dot(a, w, group_sizes, precision=precision)
        y = jax.lax.ragged_dot(a, w.values.astype(a.dtype), group_sizes, precision=precision,
                               preferred_element_type=jnp.float32)
        return (y * w.scale[row_expert, 0]).astype(a.dtype)  # scale [experts, 1, out] -> [M, out]

    return grouped(jax.nn.silu(grouped(rows, p.gate)) * grouped(rows, p.up), p.down)


def experts_swiglu_blocked(p: MoEParams, rows: Array, row_expert: Array, group_sizes: Array) -> Array:
    """The same grouped SwiGLU as dense batched matmuls: each expert's run of rows is padded to whole blocks
    of b rows (expert_blocks), every block is multiplied by its expert's weights, and the padding is dropped
    again. Indexing a QuantizedWeight by block_expert gathers its values and scales alike.
    Rows whose expert id is the number of experts (held by another device) come out zero.
    """
    M, E = rows.shape
    X = group_sizes.shape[0]
    b = min(256, 1 << (max(1, M // X).bit_length() - 1))
    blocks, block_expert, slot = expert_blocks(rows, row_expert, group_sizes, b)

    def swiglu(blocks: Array, block_expert: Array) -> Array:
        h = jax.nn.silu(einsum("nbe,nef->nbf", blocks, p.gate[block_expert]))
        h = h * einsum("nbe,nef->nbf", blocks, p.up[block_expert])
        return einsum("nbf,nfe->nbe", h, p.down[block_expert])

    n = blocks.shape[0]
    if n <= BLOCKS_PER_STEP:
        out = swiglu(blocks, block_expert)
    else:  # a step at a time, so the gathered weights are those of BLOCKS_PER_STEP blocks, not of all of them
        steps = -(-n // BLOCKS_PER_STEP)
        blocks = jnp.pad(blocks, ((0, steps * BLOCKS_PER_STEP - n), (0, 0), (0, 0)))
        block_expert = jnp.pad(block_expert, (0, steps * BLOCKS_PER_STEP - n), constant_values=X - 1)
        out = jax.lax.map(lambda a: swiglu(*a), (blocks.reshape(steps, BLOCKS_PER_STEP, b, E),
                                                 block_expert.reshape(steps, BLOCKS_PER_STEP)))
    return out.reshape(-1, E).at[slot].get(mode="fill", fill_value=0)


# The blocked kernel multiplies at most this many blocks at once: its temporary copy of expert weights is then at
# most that many experts' (16 of the 30B-A3B's 128: 150 MB in bfloat16), however many tokens a prefill has.
BLOCKS_PER_STEP = 16


def expert_blocks(rows: Array, row_expert: Array, group_sizes: Array, b: int) -> tuple[Array, Array, Array]:
    """Rows [M, E] sorted by expert -> (blocks [n_blocks, b, E], each block's expert [n_blocks], each row's slot
    [M] in the flattened blocks): each expert's run of rows padded to whole blocks of b rows, zeros after.

    With b about M / experts (a power of two), the blocks number at most about 3x the experts and padding costs
    at most experts * (b - 1) rows; with b = 1 (a decode step) a block is one row, so only the chosen experts'
    weights are read. Rows whose expert id is the number of experts get slot n_blocks * b, out of range.
    """
    M, E = rows.shape
    X = group_sizes.shape[0]
    n_blocks = -(-(M + X * (b - 1)) // b)  # enough for any split of M rows into X padded runs
    padded_sizes = -(-group_sizes // b) * b
    padded_ends = jnp.cumsum(padded_sizes)
    # Row i, the j-th of its expert's run, goes to slot j of that expert's padded run.
    run_start, padded_run_start = jnp.cumsum(group_sizes) - group_sizes, padded_ends - padded_sizes
    slot = padded_run_start[row_expert] + jnp.arange(M) - run_start[row_expert]
    slot = jnp.where(row_expert < X, slot, n_blocks * b)  # out of range: dropped on the way in, zero out
    blocks = jnp.zeros((n_blocks * b, E), rows.dtype).at[slot].set(rows, mode="drop").reshape(n_blocks, b, E)
    # Blocks past the last run hold only zeros; any expert serves them.
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * b, side="right"), X - 1)
    return blocks, block_expert, slot


def forward(
    params: Params, tokens: Array, start: Array, cache: KVCache, config: ModelConfig, window: int | None = None
) -> tuple[Array, KVCache, list[Array | None]]:
    """Run tokens [B, T] placed at positions start[b] .. start[b]+T-1.

    Returns the final-normed hidden states, the updated cache and, per layer, the router logits
    [B, T, experts] (None for a dense layer). Callers that drop the router logits pay nothing for them:
    jit removes outputs nobody reads. The caller guarantees start + T <= cache length
    for the tokens whose keys matter (slots past the cache are dropped) and, with a `window` (a static
    attention span; default the whole cache), start + T <= window for the tokens whose outputs matter.
    """
    T = tokens.shape[1]
    window = cache.max_len if window is None else window
    positions = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]
    x = params.embed[tokens]
    new_k, new_v, router_logits = [], [], []
    for i, layer in enumerate(params.layers):
        h, k_i, v_i = attention(
            layer.attn, rms_norm(x, layer.attn_norm, config.rms_norm_eps), positions,
            cache.k[i], cache.v[i], config, window,
        )
        x = x + h
        y = rms_norm(x, layer.mlp_norm, config.rms_norm_eps)
        if isinstance(layer.mlp, MoEParams):
            h, logits = moe(layer.mlp, y, config)
        else:
            h, logits = mlp(layer.mlp, y), None
        x = x + h
        new_k.append(k_i)
        new_v.append(v_i)
        router_logits.append(logits)
    return rms_norm(x, params.final_norm, config.rms_norm_eps), KVCache(k=new_k, v=new_v), router_logits


def lm_logits(params: Params, hidden: Array) -> Array:
    """Project final hidden states [..., E] to float32 logits [..., V]."""
    if params.lm_head is None:
        logits = einsum("...e,ve->...v", hidden, params.embed)
    else:
        logits = einsum("...e,ev->...v", hidden, params.lm_head)
    return logits.astype(jnp.float32)


def param_count(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts; active counts only the k routed experts of each MoE layer."""
    specs = jax.tree.leaves(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    total = sum(math.prod(s.shape) for s in specs)
    expert_params = sum(math.prod(s.shape) for s in specs if s.axes[0] == "experts")
    inactive = expert_params * (config.num_experts - config.num_experts_per_tok) // max(config.num_experts, 1)
    return total, total - inactive
