"""Matmuls in Pallas that read their weights in place, float, int8 or int4: a grouped matmul (rows in blocks, each
block times one matrix of a stack, chosen per block), which the "pallas" MoE kernel runs over the experts
(pallas_moe.py), and the same with one matrix for a quantized dense weight on a GPU (einsum_in_place), where XLA
writes int4 weights out dequantized before its GEMM reads them (`qwen3moe-jax aot`).

On GPU Pallas compiles them with Triton (tiles must then be powers of two, blocks at least 16 rows); on other
backends they run in Pallas' interpreter, slow but exact, which is how the CPU tests check them.

Quantized weights are never written out dequantized: int8 values are converted to the rows' dtype inside the kernel
(as matmul.einsum does) and the per-output-channel scale multiplies the float32 result outside it; int4 bytes are
unpacked and scaled group by group inside the kernel (_grouped_matmul_int4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model import backend
from qwen3moe_jax.model.quant import QuantizedWeight

# On a GPU the kernels go to Triton: Pallas' default there (Mosaic GPU) plans a whole weight operand into shared
# memory (measured: 126 MB asked of 227 KiB, compiling for an H100).
TRITON = pallas_triton.CompilerParams(num_warps=4, num_stages=2)
# Tile sizes: rows per block (at least 16, the smallest a Triton dot takes), contraction and output tiles.
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 16, 128
K_TILE, N_TILE = 64, 128


def einsum_in_place(spec: str, x: jax.Array, w: QuantizedWeight) -> jax.Array | None:
    """einsum(spec, x, w) for a quantized w whose contracted axes lead and x's trail, in the same order
    ("bte,ehd->bthd", "bthd,hde->bte", "...e,ev->...v"), by grouped_matmul with one matrix: x as rows [M, K], w
    read as stored as [K, N] (a free reshape: int4's groups run along the last contracted axis, so they stay
    whole). None for another form (a tied embedding's "...e,ve->...v"), which the caller computes otherwise."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n = sum(a not in out for a in w_axes)
    contracted, kept = w_axes[:n], w_axes[n:]
    if not n or any(a in out for a in contracted) or not x_axes.endswith(contracted) or out != x_axes[:-n] + kept:
        return None
    if w.bits == 4 and w.group_axis != n - 1:
        return None
    lead, N = x.shape[:-n], math.prod(w.shape[n:])
    rows = x.reshape(-1, math.prod(x.shape[-n:]))
    M = rows.shape[0]
    b = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (M - 1).bit_length()))
    blocks = jnp.pad(rows, ((0, -M % b), (0, 0))).reshape(-1, b, rows.shape[1])
    count = blocks.shape[0]
    stack = jax.tree.map(lambda a: a.reshape(1, -1, N), w)  # one matrix, [1, K (int4: K / 2, K / 32), N]
    y = grouped_matmul(blocks, jnp.zeros(count, jnp.int32), jnp.full(1, count, jnp.int32), stack)
    return y.reshape(-1, N)[:M].astype(x.dtype).reshape(*lead, *w.shape[n:])


def grouped_matmul(blocks: jax.Array, block_expert: jax.Array, used: jax.Array,
                   w: jax.Array | QuantizedWeight) -> jax.Array:
    """blocks [n, b, K] times w [experts, K, N] at each block's expert -> float32 [n, b, N]; blocks from used[0]
    on come out zero without reading any weight."""
    if isinstance(w, QuantizedWeight):
        if w.bits == 4:
            return _grouped_matmul_int4(blocks, block_expert, used, w)
        return _grouped_matmul(blocks, block_expert, used, w.values) * w.scale[block_expert]  # scale [n, 1, N]
    return _grouped_matmul(blocks, block_expert, used, w)


def _tile(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n; n itself when that is below 16 (an odd width: one tile)."""
    t = cap
    while t >= 16 and n % t:
        t //= 2
    return t if t >= 16 and n % t == 0 else n


@jax.jit
def _grouped_matmul(blocks: jax.Array, block_expert: jax.Array, used: jax.Array, w: jax.Array) -> jax.Array:
    n, b, K = blocks.shape
    N = w.shape[-1]
    bk, bn = _tile(K, K_TILE), _tile(N, N_TILE)
    precision = jax.lax.Precision.HIGHEST if blocks.dtype == jnp.float32 else None

    def kernel(expert_ref, used_ref, x_ref, w_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        e = expert_ref[i]

        def step(kk: int, acc: jax.Array) -> jax.Array:
            x = x_ref[:, pl.ds(kk * bk, bk)]
            wt = w_ref[e, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)].astype(x.dtype)
            return acc + jnp.dot(x, wt, precision=precision, preferred_element_type=jnp.float32)

        @pl.when(i < used_ref[0])
        def _() -> None:
            out_ref[...] = jax.lax.fori_loop(0, K // bk, step, jnp.zeros((b, bn), jnp.float32))

        @pl.when(i >= used_ref[0])
        def _() -> None:
            out_ref[...] = jnp.zeros((b, bn), jnp.float32)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, b, N), jnp.float32),
        grid=(n, N // bn),
        in_specs=[
            pl.no_block_spec,  # each block's expert id: read whole
            pl.no_block_spec,  # the number of blocks that hold rows
            pl.BlockSpec((None, b, K), lambda i, j: (i, 0, 0)),  # this block's rows
            pl.no_block_spec,  # the weights: indexed in the kernel by the block's expert
        ],
        out_specs=pl.BlockSpec((None, b, bn), lambda i, j: (i, 0, j)),
        interpret=backend.platform() != "gpu",
        compiler_params=TRITON,
    )(block_expert.astype(jnp.int32), used, blocks, w)


def _grouped_matmul_int4(blocks: jax.Array, block_expert: jax.Array, used: jax.Array, w: QuantizedWeight) -> jax.Array:
    """grouped_matmul of int4 weights (quant.py: values uint8 [experts, K / 2, N], two q a byte; scale and offset
    float16 [experts, K / 32, N]), read in place: each group of 32 along K is dequantized inside the kernel.

    Within a group, byte i holds q i in its low nibble and q 16 + i in its high one, so the rows are split the same
    way outside the kernel (x_low, x_high: each group's first and last 16 columns) and a group's product is
    x_low . low + x_high . high, two dots of 16. The group's scale s and offset m apply to the sum:
    x . (s q - m) = s (x . q) - m sum(x), with sum(x) over the group's 32 columns also taken outside."""
    if w.group_axis != 1:
        raise ConfigError("the pallas MoE kernel reads int4 expert weights grouped along their input axis")
    n, b, K = blocks.shape
    N, G = w.values.shape[-1], K // 32
    grouped = blocks.reshape(n, b, G, 2, 16)
    x_low, x_high = (grouped[:, :, :, half].reshape(n, b, K // 2) for half in (0, 1))
    x_sums = jnp.sum(grouped.astype(jnp.float32), axis=(3, 4))  # [n, b, G]
    # Symmetric groups (w = s (q - 8)) take m = 8 s inside the kernel: 8 s computed outside would be a buffer the
    # size of the scales, written per weight and kept through a decode block (`aot`: 1.8 GB at 30B-A3B int4).
    symmetric = w.offset is None
    bn = _tile(N, N_TILE)

    def kernel(expert_ref, used_ref, low_ref, high_ref, sums_ref, values_ref, scale_ref, *refs):
        *offset_ref, out_ref = refs
        i, j = pl.program_id(0), pl.program_id(1)
        e = expert_ref[i]
        columns = pl.ds(j * bn, bn)

        def group(g: int, acc: jax.Array) -> jax.Array:
            packed = values_ref[e, pl.ds(g * 16, 16), columns]  # [16, bn] uint8
            low = (packed & 15).astype(blocks.dtype)
            high = (packed >> 4).astype(blocks.dtype)
            dot = (jnp.dot(low_ref[:, pl.ds(g * 16, 16)], low, preferred_element_type=jnp.float32)
                   + jnp.dot(high_ref[:, pl.ds(g * 16, 16)], high, preferred_element_type=jnp.float32))
            s = scale_ref[e, pl.ds(g, 1), columns].astype(jnp.float32)  # [1, bn]
            m = 8 * s if symmetric else offset_ref[0][e, pl.ds(g, 1), columns].astype(jnp.float32)
            return acc + dot * s - sums_ref[:, pl.ds(g, 1)] * m

        @pl.when(i < used_ref[0])
        def _() -> None:
            out_ref[...] = jax.lax.fori_loop(0, G, group, jnp.zeros((b, bn), jnp.float32))

        @pl.when(i >= used_ref[0])
        def _() -> None:
            out_ref[...] = jnp.zeros((b, bn), jnp.float32)

    rows = pl.BlockSpec((None, b, K // 2), lambda i, j: (i, 0, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, b, N), jnp.float32),
        grid=(n, N // bn),
        in_specs=[pl.no_block_spec, pl.no_block_spec, rows, rows, pl.BlockSpec((None, b, G), lambda i, j: (i, 0, 0)),
                  pl.no_block_spec, pl.no_block_spec] + [pl.no_block_spec] * (not symmetric),  # weights read whole
        out_specs=pl.BlockSpec((None, b, bn), lambda i, j: (i, 0, j)),
        interpret=backend.platform() != "gpu",
        compiler_params=TRITON,
    )(block_expert.astype(jnp.int32), used, x_low, x_high, x_sums, w.values, w.scale,
      *(() if symmetric else (w.offset,)))
