"""The params pytree of Qwen3-MoE: one dataclass per layer kind, with a ParamSpec (shape and logical axis names)
at every leaf from which random init, checkpoint loading and sharding all derive.

Weights are stored input-major (`[in, out]`, heads kept as their own axis) so every projection is one einsum
(matmul.py). Every array dimension has a logical axis name (`vocab`, `embed`, `heads`, ...), which sharding.py
maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.quant import QuantizedWeight, host_param, stored_shape
from qwen3moe_jax.model.sharding import place


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


def abstract_params(config: ModelConfig, dtype: Any, sharding: Any = None) -> Params:
    """The params pytree `load` would make for `dtype`, as jax.ShapeDtypeStruct leaves (on `sharding`, when
    given): for compiling ahead of time and planning memory, with no weight allocated."""
    def leaf(name: str, spec: ParamSpec) -> Any:
        stored = stored_shape(name, spec.axes, spec.shape, dtype)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), stored)

    specs = param_specs(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    return jax.tree_util.tree_unflatten(treedef, [leaf(param_name(path), spec) for path, spec in flat])


def param_count(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts; active counts only the k routed experts of each MoE layer."""
    specs = jax.tree.leaves(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    total = sum(math.prod(s.shape) for s in specs)
    expert_params = sum(math.prod(s.shape) for s in specs if s.axes[0] == "experts")
    inactive = expert_params * (config.num_experts - config.num_experts_per_tok) // max(config.num_experts, 1)
    return total, total - inactive
