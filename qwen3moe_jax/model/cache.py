"""The KV cache: one preallocated buffer per layer, updated in place by the jit steps that own it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.sharding import zeros

# Logical axes of every cache buffer, for sharding rules.
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")


@struct.dataclass
class KVCache:
    """Keys and values per layer, each [batch, kv_heads, max_len, head_dim].

    Layout: heads before positions so a decode step reads each head's keys as one contiguous run.
    The cache holds no fill level: each step is told its positions, and attention masks slots beyond them.
    """

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def init(
        cls, config: ModelConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32, mesh: Any = None
    ) -> KVCache:
        """Zeroed buffers; with a mesh, created directly in their shards (batch on data, kv heads on tensor)."""
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            k=[zeros(shape, dtype, CACHE_AXES, mesh) for _ in range(config.num_layers)],
            v=[zeros(shape, dtype, CACHE_AXES, mesh) for _ in range(config.num_layers)],
        )
