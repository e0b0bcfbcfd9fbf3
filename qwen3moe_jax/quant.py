"""int8 weight-only quantization: symmetric, one scale per output channel, quantized on the host at load.

A decode step at batch 1 is bound by the bytes of weight it reads, not by arithmetic, so storing the big
matrices as int8 (half of bfloat16) is what makes it faster; activations, the KV cache and the matmuls
stay bfloat16. Each output channel c of a weight W gets scale[c] = max|W[..., c]| / 127 and
values = round(W / scale), so a weight is off by at most scale / 2 = absmax / 254 per element.

The scale is constant along the axes a matmul contracts, so it can be applied to the matmul's OUTPUT:
x @ (values * scale) == (x @ values) * scale, exactly. The matmul then reads the int8 values directly
(converted to the compute dtype as they are loaded, which XLA fuses into the operand read on GPU), and
the dequantized weight never exists in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import struct

from qwen3moe_jax.errors import CheckpointError

# What dtype="int8" computes in: int8 is only how the weights are stored.
INT8_COMPUTE_DTYPE = np.dtype("bfloat16")


@struct.dataclass
class QuantizedWeight:
    """An int8 weight and its per-output-channel scale, a plain pytree of two arrays.

    values: int8, the float weight's shape. scale: float32, the same rank with the contracted axes kept
    as size 1, so a sharding rule keyed on the weight's logical axes fits both arrays (a size-1 dim is
    simply replicated). float32 rather than the compute dtype: a bfloat16 scale would be off by up to
    2^-9 of itself, one error shared by a whole output channel, and it costs 4 bytes per output channel
    against the channel's hundreds to thousands of int8 values (0.2% more bytes for an expert's gate).
    """

    values: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __getitem__(self, index: Any) -> QuantizedWeight:
        """Index the leading axis of both arrays (e.g. gather experts), which must not be a contracted one."""
        assert self.scale.shape[0] == self.values.shape[0], "the leading axis is contracted: it has one scale"
        return QuantizedWeight(self.values[index], self.scale[index])


def contracted_axes(axes: tuple[str, ...]) -> tuple[int, ...]:
    """Which axes of a weight (by its logical axis names) a matmul contracts, i.e. the axes one scale spans.

    Every matrix of the model either reads the residual stream ("embed" is its first non-expert axis,
    e.g. q [embed, heads, head_dim], an expert's gate [experts, embed, expert_ffn], lm_head [embed, vocab])
    or writes it ("embed" is its last axis: attention's o [heads, head_dim, embed], an expert's down
    [experts, expert_ffn, embed], the dense MLP's down [ffn, embed]). A reader contracts "embed"; a
    writer contracts every axis but "experts" (a batch axis: each expert is its own matrix) and "embed".
    """
    if axes[-1] == "embed":
        return tuple(i for i, name in enumerate(axes) if name not in ("experts", "embed"))
    return (axes.index("embed"),)


def is_quantized(name: str, axes: tuple[str, ...]) -> bool:
    """Whether dtype="int8" stores this param (by dotted name) as a QuantizedWeight: every matrix of
    attention, the experts, the dense MLPs and lm_head. Kept in the compute dtype:
    - the norms (vectors): a few kilobytes per layer;
    - the embedding table: each token reads one row of it by a gather, so int8 would save memory but
      almost no bytes read per token;
    - the routers: 0.5 MB per layer at the 30B-A3B shape, and precision-sensitive, since the router
      picks the experts and a rounding that flips a top-k choice changes the output far more than a
      rounded weight does."""
    return len(axes) >= 2 and name.rsplit(".", 1)[-1] not in ("embed", "router")


def quantize(array: np.ndarray, axes: tuple[int, ...]) -> QuantizedWeight:
    """Symmetric int8 quantization of a host array with one scale per slice along `axes` (the contracted
    axes): scale = absmax / 127, values = round(array / scale). An all-zero slice gets scale 0."""
    w = np.asarray(array, np.float32)
    # max and -min rather than abs: no temporary copy of a tensor that may be most of a GB.
    absmax = np.maximum(w.max(axis=axes, keepdims=True), -w.min(axis=axes, keepdims=True))
    if not np.isfinite(absmax).all():
        raise CheckpointError("cannot quantize a weight holding inf or NaN to int8")
    scale = absmax / np.float32(127)
    q = w / np.where(scale > 0, scale, np.float32(1))
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return QuantizedWeight(values=q.astype(np.int8), scale=scale)


def dequantize(weight: QuantizedWeight) -> Any:
    """values * scale in float32 (numpy or jax arrays alike)."""
    return weight.values.astype(np.float32) * weight.scale


def host_param(name: str, axes: tuple[str, ...], array: np.ndarray, dtype: Any) -> np.ndarray | QuantizedWeight:
    """A float host array -> the param as it goes to the device for `dtype`: cast to it, or for int8 the
    matrices is_quantized picks quantized (contracting contracted_axes) and the rest in bfloat16.
    Done on the host one tensor at a time, so the float weights never all exist at once."""
    if np.dtype(dtype) != np.int8:
        return np.asarray(array, dtype)
    if not is_quantized(name, axes):
        return np.asarray(array, INT8_COMPUTE_DTYPE)
    try:
        return quantize(array, contracted_axes(axes))
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
