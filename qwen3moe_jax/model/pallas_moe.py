"""The "pallas" MoE kernel: the grouped matmul of pallas_matmul.py over the blocked form's blocks
(moe_kernels.expert_blocks).

Each program of the grid multiplies one block of rows (all of one expert) by one column tile of that expert's
weights, read in place from the [experts, in, out] weight through the block's expert id: no gathered copy of the
weights exists (the blocked XLA form materializes one per block), and temporary memory is the padded rows only.
Quantized weights are read as stored, never written out dequantized. "auto" takes this kernel for int4 experts on a
GPU (moe.choose_moe_kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3moe_jax.model.moe_kernels import expert_blocks
from qwen3moe_jax.model.pallas_matmul import MAX_BLOCK_ROWS, MIN_BLOCK_ROWS, grouped_matmul
from qwen3moe_jax.model.params import MoEParams


def experts_swiglu_pallas(p: MoEParams, rows: jax.Array, row_expert: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """SwiGLU of rows [M, E] sorted by expert (as moe_kernels.experts_swiglu_blocked), by grouped_matmul."""
    M, X = rows.shape[0], group_sizes.shape[0]
    b = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (max(1, M // X).bit_length() - 1)))
    blocks, block_expert, slot = expert_blocks(rows, row_expert, group_sizes, b)
    # The blocks that hold rows; the rest (the static count allows for every split of the rows) are skipped.
    used = jnp.sum(-(-group_sizes // b), keepdims=True).astype(jnp.int32)
    h = jax.nn.silu(grouped_matmul(blocks, block_expert, used, p.gate))
    h = h * grouped_matmul(blocks, block_expert, used, p.up)
    out = grouped_matmul(h.astype(rows.dtype), block_expert, used, p.down)
    return out.astype(rows.dtype).reshape(-1, rows.shape[1]).at[slot].get(mode="fill", fill_value=0)
