"""The KV cache: one preallocated buffer per layer, updated in place by the jit steps that own it.

The cache is kept in the model's compute dtype, or with kv_dtype "int8" as int8 values with one float16 scale per
token and head (symmetric, absmax / 127 over head_dim): half the bytes of bfloat16, plus 2 bytes per token and head
(1.6% at head_dim 128). Keys and values are quantized as they are written (`quantize_kv`), the keys rotated first by
a fixed orthogonal matrix (`key_rotation`, queries alike, so q.k is unchanged); attention applies the scales to its
scores and probabilities rather than writing a dequantized copy of the window (transformer.attend).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qwen3moe_jax.errors import ConfigError, ContextLengthError
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.sharding import zeros

# Logical axes of every cache buffer, for sharding rules; a scale has no head_dim.
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
SCALE_AXES = CACHE_AXES[:3]
# "model": the model's compute dtype (float32, bfloat16, ...; bfloat16 for int8/int4 weights).
KV_DTYPES = ("model", "int8")
SCALE_DTYPE = jnp.float16


@struct.dataclass
class KVCache:
    """Keys and values per layer, each [batch, kv_heads, max_len, head_dim]; with an int8 cache, their scales per
    layer [batch, kv_heads, max_len] (None otherwise).

    Layout: heads before positions so a decode step reads each head's keys as one contiguous run.
    The cache holds no fill level: each step is told its positions, and attention masks slots beyond them.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    k_scale: list[jax.Array] | None = None
    v_scale: list[jax.Array] | None = None

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def arrays(self) -> list[jax.Array]:
        """Every buffer of the cache (values and scales)."""
        return self.k + self.v + (self.k_scale or []) + (self.v_scale or [])

    def layer(self, i: int) -> KVCache:
        """Layer i's buffers, as a cache of one layer."""
        return jax.tree.map(lambda arrays: [arrays[i]], self, is_leaf=lambda a: isinstance(a, list))

    @classmethod
    def join(cls, layers: list[KVCache]) -> KVCache:
        """The caches of one layer each, in order, as one cache (the inverse of `layer`)."""
        return jax.tree.map(lambda *ones: [one[0] for one in ones], *layers, is_leaf=lambda a: isinstance(a, list))

    @classmethod
    def init(
        cls, config: ModelConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32, mesh: Any = None,
        kv_dtype: str = "model",
    ) -> KVCache:
        """Zeroed buffers in `dtype` (kv_dtype "model") or int8 with scales; with a mesh, created directly in their
        shards (batch on data, kv heads on tensor)."""
        check_kv_dtype(kv_dtype)
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        L = config.num_layers
        if kv_dtype == "model":
            return cls(k=[zeros(shape, dtype, CACHE_AXES, mesh) for _ in range(L)],
                       v=[zeros(shape, dtype, CACHE_AXES, mesh) for _ in range(L)])
        return cls(k=[zeros(shape, jnp.int8, CACHE_AXES, mesh) for _ in range(L)],
                   v=[zeros(shape, jnp.int8, CACHE_AXES, mesh) for _ in range(L)],
                   k_scale=[zeros(shape[:3], SCALE_DTYPE, SCALE_AXES, mesh) for _ in range(L)],
                   v_scale=[zeros(shape[:3], SCALE_DTYPE, SCALE_AXES, mesh) for _ in range(L)])


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}", "kv_dtype")
    return kv_dtype


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] as int8 values and a float16 scale per vector [...]: x ~= values * scale. The values are
    rounded against the float16 scale itself, so dequantizing uses exactly the scale they were divided by."""
    xf = x.astype(jnp.float32)
    scale = jnp.minimum(jnp.max(jnp.abs(xf), axis=-1) / 127, jnp.finfo(SCALE_DTYPE).max).astype(SCALE_DTYPE)
    divisor = jnp.where(scale == 0, 1, scale.astype(jnp.float32))[..., None]  # a zero vector stays zero
    return jnp.clip(jnp.round(xf / divisor), -127, 127).astype(jnp.int8), scale


@cache
def key_rotation(head_dim: int) -> np.ndarray:
    """The orthogonal [head_dim, head_dim] float32 matrix R an int8 cache rotates keys and queries by (k @ R, q @ R)
    before the keys are quantized: fixed random signs, then a normalised Walsh-Hadamard transform (Sylvester's
    construction; a block-diagonal one over the powers of two that sum to head_dim when it is not one). R R^T = I, so
    q.k is unchanged, while a key whose magnitude sits in a few channels (after the k norm and the rotary, the fast
    rotary channels are several times the others) is spread over all of them: its absmax, and with it the int8 step,
    shrinks. The rotation of QuaRot's and SpinQuant's KV caches; the signs keep a key's mean away from one channel."""
    blocks, left = [], head_dim
    while left:
        size = 1 << (left.bit_length() - 1)
        h = np.ones((1, 1))
        while len(h) < size:
            h = np.block([[h, h], [h, -h]])
        blocks.append(h / np.sqrt(size))
        left -= size
    rotation, at = np.zeros((head_dim, head_dim)), 0
    for block in blocks:
        rotation[at : at + len(block), at : at + len(block)] = block
        at += len(block)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], head_dim)
    return (signs[:, None] * rotation).astype(np.float32)


def rotate_keys(x: jax.Array) -> jax.Array:
    """x [..., head_dim] (keys or queries) times key_rotation, in float32, back in x's dtype."""
    rotation = jnp.asarray(key_rotation(x.shape[-1]))
    return jnp.matmul(x.astype(jnp.float32), rotation, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def bytes_per_token(config: ModelConfig, dtype: Any, kv_dtype: str = "model") -> int:
    """Cache bytes of one token in one row, every layer's keys and values (with their scales for int8)."""
    per_vector = config.head_dim + SCALE_DTYPE.dtype.itemsize if kv_dtype == "int8" else \
        config.head_dim * jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * per_vector


def check_cache_fits(config: ModelConfig, batch: int, max_len: int, dtype: Any, kv_dtype: str,
                     free_bytes: float) -> None:
    """A ContextLengthError saying what fits when a cache of batch x max_len tokens needs more than 90% of
    free_bytes (what the device has left after the weights; the rest is for activations and XLA's buffers)."""
    room = 0.9 * free_bytes

    def longest(kv: str) -> int:  # tokens per row that fit, in whole attention blocks of 256
        return int(room // (bytes_per_token(config, dtype, kv) * batch)) // 256 * 256

    per_token = bytes_per_token(config, dtype, kv_dtype)
    if per_token * batch * max_len <= room:
        return
    held = jnp.dtype(dtype).name if kv_dtype == "model" else kv_dtype
    cheaper = "" if kv_dtype == "int8" else f" ({longest('int8')} with kv_dtype int8)"
    raise ContextLengthError(
        f"a KV cache of {batch} rows x {max_len} tokens ({held}, {per_token / 1e3:.1f} KB a token) needs "
        f"{per_token * batch * max_len / 1e9:.1f} GB, but the device has {free_bytes / 1e9:.1f} GB free after the "
        f"weights (90% of it for the cache): at most {longest(kv_dtype)} tokens per row fit at {batch} rows{cheaper}; "
        "lower max_seq_len or max_batch")
