"""Memory plan: per-device bytes of params and KV cache for a preset on a mesh, before anything is allocated.

Param shapes come from the param specs and the cache's from `jax.eval_shape` of its constructor, so no array
is made; each array's per-device share follows the rules table the loader shards by (sharding.logical_spec).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.model.cache import CACHE_AXES, SCALE_AXES, KVCache
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import named_leaves, param_specs
from qwen3moe_jax.model.quant import INT8_COMPUTE_DTYPE, stored_shape
from qwen3moe_jax.model.sharding import MESH_AXES, logical_spec

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: dict[str, int]
    dtype: str
    context: int
    batch: int
    params_total: int  # bytes over all devices (without replication)
    params_per_device: int  # bytes on the most loaded device
    cache_per_device: int
    kv_dtype: str = "bfloat16"  # what the cache holds: the compute dtype, or int8 (with its scales)

    @property
    def per_device(self) -> int:
        return self.params_per_device + self.cache_per_device

    def fits(self, device_bytes: float, headroom: float = 0.9) -> bool:
        """Whether params and cache fit in `headroom` of a device (the rest: activations, XLA workspace)."""
        return self.per_device <= device_bytes * headroom


def _shard_bytes(shape: tuple[int, ...], dtype: np.dtype, axes: tuple[str | None, ...],
                 sizes: Mapping[str, int]) -> int:
    spec = logical_spec(axes, shape, sizes)
    shard = [dim // (sizes[a] if a else 1) for dim, a in zip(shape, spec, strict=True)]
    return math.prod(shard) * np.dtype(dtype).itemsize


def plan(config: ModelConfig, mesh: Mapping[str, int], dtype: str = "bfloat16", context: int = 32768,
         batch: int = 1, kv_dtype: str = "model") -> Plan:
    """Bytes per device of `config`'s params in `dtype` ("int8": int8 matrices with float32 per-channel
    scales, the rest bfloat16; "int4": those matrices two weights a byte with a float16 scale per group of
    32, as quantized from float weights or a Q4_0 file; a Q4_K file's groups add a float16 offset each,
    0.5 bits a weight more) and of a KV cache of batch x context tokens (kv_dtype "model": in the compute dtype;
    "int8": int8 with a float16 scale per token and head), on a mesh of these axis sizes."""
    sizes = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
    compute = np.dtype(INT8_COMPUTE_DTYPE if dtype in ("int8", "int4") else dtype)
    total = per_device = 0
    for name, spec in named_leaves(param_specs(config)).items():
        for part in jax.tree.leaves(stored_shape(name, spec.axes, spec.shape, np.dtype(dtype))):
            total += math.prod(part.shape) * part.dtype.itemsize
            per_device += _shard_bytes(part.shape, part.dtype, spec.axes, sizes)
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, context, jnp.dtype(compute), kv_dtype=kv_dtype))
    cache_bytes = sum(_shard_bytes(a.shape, a.dtype, CACHE_AXES if a.ndim == 4 else SCALE_AXES, sizes)
                      for a in cache.arrays)
    held = compute.name if kv_dtype == "model" else kv_dtype
    return Plan(sizes, dtype, context, batch, total, per_device, cache_bytes, held)


def format_plans(rows: list[tuple[str, Plan]], device_gb: float) -> str:
    """A table, one row per (model name, plan)."""
    header = (f"{'model':<20} {'mesh (d,e,t)':>12} {'dtype':>9} {'KV dtype':>9} {'ctx x batch':>13} "
              f"{'params/dev':>11} {'KV/dev':>9} {'total/dev':>10}  fits {device_gb:g} GB")
    lines = [header, "-" * len(header)]
    for name, p in rows:
        mesh = ",".join(str(p.mesh[a]) for a in MESH_AXES)
        lines.append(f"{name:<20} {mesh:>12} {p.dtype:>9} {p.kv_dtype:>9} {f'{p.context}x{p.batch}':>13} "
                     f"{p.params_per_device / GB:>9.1f}GB {p.cache_per_device / GB:>7.1f}GB "
                     f"{p.per_device / GB:>8.1f}GB  {'yes' if p.fits(device_gb * GB) else 'no'}")
    return "\n".join(lines)
