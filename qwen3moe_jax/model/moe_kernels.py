"""The MoE expert kernels: SwiGLU of (token, expert) rows by their experts' weights, each reading only the chosen
experts (moe.py says which runs when; pallas_moe.py holds the Pallas one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3moe_jax.model import cpu_kernels
from qwen3moe_jax.model.matmul import einsum, int4_operand
from qwen3moe_jax.model.params import MoEParams
from qwen3moe_jax.model.quant import QuantizedWeight

Array = jax.Array


def experts_swiglu_gather(p: MoEParams, rows: Array, row_expert: Array) -> Array:
    """SwiGLU of each row [M, E] by its own expert's weights (row_expert [M], any order), gathered per row.
    Rows whose expert id is the number of experts (held by another device) come out zero. Indexing a
    QuantizedWeight gathers its values and scales alike."""
    held = p.gate.shape[0]
    expert = jnp.minimum(row_expert, held - 1)
    h = jax.nn.silu(einsum("me,mef->mf", rows, p.gate[expert])) * einsum("me,mef->mf", rows, p.up[expert])
    out = einsum("mf,mfe->me", h, p.down[expert])
    return jnp.where((row_expert < held)[:, None], out, 0)


@cpu_kernels.with_gradient_of(experts_swiglu_gather)
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
