"""Weight-only quantization, done on the host at load: int8 (one scale per output channel) and int4 (one scale,
and where the source has one an offset, per group of 32 along the contracted axis).

A decode step at batch 1 is bound by the bytes of weight it reads, not by arithmetic, so storing the big
matrices as int8 (half of bfloat16) is what makes it faster; activations, the KV cache and the matmuls
stay bfloat16. Each output channel c of a weight W gets scale[c] = max|W[..., c]| / 127 and
values = round(W / scale), so a weight is off by at most scale / 2 = absmax / 254 per element.

The scale is constant along the axes a matmul contracts, so it can be applied to the matmul's OUTPUT:
x @ (values * scale) == (x @ values) * scale, exactly. The matmul then reads the int8 values directly
(converted to the compute dtype as they are loaded, which XLA fuses into the operand read on GPU), and
the dequantized weight never exists in memory.

int4 halves the bytes again (4.5 bits a weight with its scales), which is what puts the 30B-A3B shape on a
24 GB card. Its layout is GGUF's Q4_0 and Q4_K blocks taken apart, so a file's 4-bit numbers reach the device
as llama.cpp computes with them: each group of 32 consecutive weights along the contracted ("input") axis
has a float16 scale s and, for asymmetric sources (Q4_K), a float16 offset m, and w = s * q - m with q in
0..15; without an offset w = s * (q - 8) (Q4_0, and our own quantization of float weights, which is ggml's
Q4_0 rounding). Two q share a byte: in each group's 16 bytes, byte i holds q[i] in its low nibble and
q[i + 16] in its high one, as Q4_0 stores them. A scale varies along the contracted axis, so it cannot
be applied to a matmul's output as int8's is: the einsum dequantizes the weight in its operand instead
(model.int4_operand), for XLA to fuse into the matmul's read on GPU.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct
from gguf import GGMLQuantizationType, quants

from qwen3moe_jax.errors import CheckpointError

# What dtype="int8" and "int4" compute in: int8 / int4 is only how the weights are stored.
INT8_COMPUTE_DTYPE = np.dtype("bfloat16")
INT4 = np.dtype(ml_dtypes.int4)  # the dtype that asks for int4 storage (np.dtype("int4") once ml_dtypes is loaded)
GROUP = 32  # int4 weights per scale, along the contracted axis: GGUF's Q4_0 block and Q4_K sub-block
QUANTIZE_SLICE = 1 << 22  # weights quantized to int4 at a time (quantize_int4)


@struct.dataclass
class QuantizedWeight:
    """A quantized weight: a plain pytree of two or three arrays, all of the float weight's rank and logical
    axes, so a sharding rule keyed on those axes places each of them (a size-1 dim is simply replicated).

    int8: values int8 in the float weight's shape; scale float32 with the contracted axes kept as size 1.
    float32 rather than the compute dtype: a bfloat16 scale would be off by up to 2^-9 of itself, one error
    shared by a whole output channel, and it costs 4 bytes per output channel against the channel's hundreds
    to thousands of int8 values (0.2% more bytes for an expert's gate).

    int4: values uint8, two q a byte, so the group axis (the last contracted one) is K / 2 long; scale
    float16 and offset float16 or None (symmetric) with that axis K / 32 long, one entry per group.
    float16 is the type GGUF stores its block scales in.
    """

    values: Any
    scale: Any
    offset: Any = None

    @property
    def bits(self) -> int:
        return 4 if self.values.dtype == np.uint8 else 8

    @property
    def group_axis(self) -> int:
        """int4: the axis the groups run along, the one axis where values and scale differ in length."""
        (axis,) = [i for i, (v, s) in enumerate(zip(self.values.shape, self.scale.shape, strict=True)) if v != s]
        return axis

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        if self.bits == 8:
            return self.values.shape
        shape = list(self.values.shape)
        shape[self.group_axis] *= 2
        return tuple(shape)

    def __getitem__(self, index: Any) -> QuantizedWeight:
        """Index the leading axis of every array (e.g. gather experts), which must not be a contracted one."""
        assert self.scale.shape[0] == self.values.shape[0], "the leading axis is contracted: it has one scale"
        offset = None if self.offset is None else self.offset[index]
        return QuantizedWeight(self.values[index], self.scale[index], offset)


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


def group_axis(axes: tuple[str, ...]) -> int:
    """The axis int4's groups of 32 run along: the last contracted one (head_dim for attention's o, whose
    GGUF rows run over heads x head_dim; a group lies within one head when head_dim divides into groups)."""
    return contracted_axes(axes)[-1]


def quantize_int4(array: np.ndarray, axis: int) -> QuantizedWeight:
    """int4 of a host array in groups of 32 along `axis`, by ggml's own Q4_0 rounding (gguf.quants): each group's
    scale is its element of largest magnitude / -8, so that element is exactly q = 0, and
    q = clip(trunc(w / scale + 8.5), 0, 15); the scale is stored as float16. Done a slice of about 4M weights
    at a time, so gguf's float32 temporaries stay small beside a tensor that may be most of a GB."""
    w = np.moveaxis(np.asarray(array, np.float32), axis, -1)  # a view: the slices below copy what they need
    step = max(1, QUANTIZE_SLICE // math.prod(w.shape[1:]))
    blocks = []
    for start in range(0, w.shape[0], step):
        part = np.ascontiguousarray(w[start:start + step])
        if not np.isfinite(part).all():
            raise CheckpointError("cannot quantize a weight holding inf or NaN to int4")
        with np.errstate(over="ignore"):  # a scale beyond float16 becomes inf, refused below
            blocks.append(quants.quantize(part, GGMLQuantizationType.Q4_0))
    return int4_from_gguf_blocks(np.concatenate(blocks), GGMLQuantizationType.Q4_0, axis)


def int4_from_gguf_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType, axis: int) -> QuantizedWeight:
    """GGUF Q4_0 or Q4_K blocks (uint8 [..., bytes of a row], rows along the last axis) as int4 with their
    numbers kept, the rows' axis moved to `axis`:
    - Q4_0, 32 values a block: d (float16), 16 bytes of q; w = d * (q - 8): scale d, no offset.
    - Q4_K, 256 values a block: d, dmin (float16), 8 six-bit sub-block scales sc and minimums mn packed in 12
      bytes, 128 bytes of q; w = d * sc * q - dmin * mn for each sub-block of 32: scale d * sc and offset
      dmin * mn, exact in float32 and rounded once to float16 (by at most 2^-11 of themselves).
    Memory: a few bytes a weight of uint8 and float16 temporaries, never a float32 copy of the weight."""
    lead, row_bytes = blocks.shape[:-1], blocks.shape[-1]
    block_size, type_size = quants.GGML_QUANT_SIZES[qtype]
    b = np.asarray(blocks, np.uint8).reshape(-1, type_size)
    offset = None
    if qtype == GGMLQuantizationType.Q4_0:
        scale, packed = b[:, :2].copy().view(np.float16), b[:, 2:]  # [n, 1], [n, 16]: already our layout
    elif qtype == GGMLQuantizationType.Q4_K:
        d, dmin = (b[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
        sc, mn = quants.Q4_K.get_scale_min(b[:, 4:16])  # [n, 8] each
        scale, offset = (d * sc).astype(np.float16), (dmin * mn).astype(np.float16)
        # 4 chunks of 32 bytes: the low nibbles are sub-block 2j's 32 q, the high ones sub-block 2j+1's.
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & np.uint8(15)).reshape(-1, 8, 32)
        packed = q[..., :16] | (q[..., 16:] << np.uint8(4))  # [n, 8, 16]
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type with 32-value groups")
    if not (np.isfinite(scale).all() and (offset is None or np.isfinite(offset).all())):
        raise CheckpointError("an int4 group scale overflows float16 (weights beyond ~5e5)")
    groups = row_bytes // type_size * block_size // GROUP

    def to_axis(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a.reshape(*lead, -1), -1, axis)

    return QuantizedWeight(values=to_axis(packed), scale=to_axis(scale.reshape(-1, groups)),
                           offset=None if offset is None else to_axis(offset.reshape(-1, groups)))


def unpack_int4(values: Any, axis: int) -> Any:
    """Packed int4 (uint8, K / 2 along `axis`) -> q in 0..15 (uint8, K along `axis`), numpy or jax alike.

    Written as one broadcast shift and mask, no concatenate, so that a GEMM fusion can take the whole unpack
    into its operand read (XLA's Triton GEMM fusions accept broadcasts and elementwise ops)."""
    xp = np if isinstance(values, np.ndarray) else jnp
    shape = values.shape
    v = values.reshape(*shape[:axis], shape[axis] // 16, 1, 16, *shape[axis + 1:])
    # Each group's 16 bytes give its first 16 q from their low nibbles, then the next 16 from the high ones.
    shifts = xp.asarray(np.array([0, 4], np.uint8).reshape(2, *(1,) * (v.ndim - axis - 2)))
    q = (v >> shifts) & np.uint8(15)
    return q.reshape(*shape[:axis], shape[axis] * 2, *shape[axis + 1:])


def dequantize(weight: QuantizedWeight) -> Any:
    """The float32 weight (numpy or jax arrays alike): values * scale for int8; for int4 s * q - m per group."""
    if weight.bits == 8:
        return weight.values.astype(np.float32) * weight.scale
    axis = weight.group_axis
    q = unpack_int4(weight.values, axis).astype(np.float32)
    shape = q.shape
    grouped = (*shape[:axis], shape[axis] // GROUP, GROUP, *shape[axis + 1:])
    scale = weight.scale.astype(np.float32).reshape(*grouped[:axis + 1], 1, *grouped[axis + 2:])
    offset = (np.float32(8) * scale if weight.offset is None else
              weight.offset.astype(np.float32).reshape(scale.shape))
    return (q.reshape(grouped) * scale - offset).reshape(shape)


def is_int4_groupable(axes: tuple[str, ...], shape: tuple[int, ...]) -> bool:
    """Whether a matrix is_quantized picks divides into int4's groups of 32 along its group axis; one that
    does not (a test preset's head_dim of 24) stays in the compute dtype, as a GGUF writer keeps it float."""
    return shape[group_axis(axes)] % GROUP == 0


def stored_shape(name: str, axes: tuple[str, ...], shape: tuple[int, ...],
                 dtype: Any) -> jax.ShapeDtypeStruct | QuantizedWeight:
    """What host_param makes of a float weight of `shape` for `dtype`, as shapes and dtypes only (nothing is
    allocated): the compute dtype's array, or the QuantizedWeight's arrays (int8: values and a float32 scale with
    the contracted axes of size 1; int4: two weights a byte and a float16 scale per group of 32, as quantized from
    float weights or a Q4_0 file; a Q4_K file's groups add a float16 offset each, which this leaves out)."""
    dtype = np.dtype(dtype)
    compute = INT8_COMPUTE_DTYPE if dtype in (np.int8, INT4) else dtype
    if dtype not in (np.int8, INT4) or not is_quantized(name, axes) or (
            dtype == INT4 and not is_int4_groupable(axes, shape)):
        return jax.ShapeDtypeStruct(shape, compute)
    if dtype == np.int8:
        scale = tuple(1 if i in contracted_axes(axes) else d for i, d in enumerate(shape))
        return QuantizedWeight(jax.ShapeDtypeStruct(shape, np.int8), jax.ShapeDtypeStruct(scale, np.float32))
    axis = group_axis(axes)
    packed, grouped = ([d // per if i == axis else d for i, d in enumerate(shape)] for per in (2, GROUP))
    return QuantizedWeight(jax.ShapeDtypeStruct(tuple(packed), np.uint8), jax.ShapeDtypeStruct(tuple(grouped),
                                                                                              np.float16))


def host_param(name: str, axes: tuple[str, ...], array: np.ndarray | QuantizedWeight,
               dtype: Any) -> np.ndarray | QuantizedWeight:
    """A float host array -> the param as it goes to the device for `dtype`: cast to it, or for int8 / int4
    the matrices is_quantized picks quantized (int8 contracting contracted_axes; int4 in groups along
    group_axis, where they divide) and the rest in bfloat16. An int4 QuantizedWeight (GGUF's own 4-bit
    blocks) passes as it is. Done on the host one tensor at a time, so the float weights never all exist
    at once."""
    dtype = np.dtype(dtype)
    if isinstance(array, QuantizedWeight):
        assert dtype == INT4 and array.bits == 4, "only int4 is read from a file as stored"
        return array
    if dtype not in (np.int8, INT4):
        return np.asarray(array, dtype)
    if not is_quantized(name, axes) or (dtype == INT4 and not is_int4_groupable(axes, array.shape)):
        return np.asarray(array, INT8_COMPUTE_DTYPE)
    try:
        return quantize(array, contracted_axes(axes)) if dtype == np.int8 else quantize_int4(array, group_axis(axes))
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
