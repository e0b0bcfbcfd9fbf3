#!/usr/bin/env python
"""Does XLA fuse int4 dequantization into the matmul, or write the dequantized weight out first?

Compiles one decode-sized matmul per int4 weight shape of a preset (default the 30B-A3B shape: attention's q
and o, an expert's gate and down after gathering 8 experts, lm_head) on the default backend, reads the
optimized HLO, and reports for each whether some fusion outputs the whole weight in a float type (the
dequantized copy materialized in memory, then read again by the dot) or whether the dot's own fusion reads
the packed bytes (on GPU: a Triton GEMM fusion holding the unpack and the scale multiply). Exits 1 if any
weight is materialized and --require-fused is given.

    python scripts/int4_fusion_check.py                     # CPU: materialized (XLA:CPU fuses no dot operand)
    python scripts/int4_fusion_check.py --require-fused     # GPU: expected fused
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.model.config import preset
from qwen3moe_jax.model.matmul import einsum
from qwen3moe_jax.model.quant import GROUP, QuantizedWeight


def int4_weight(shape: tuple[int, ...], axis: int) -> QuantizedWeight:
    """Zero bytes and unit scales of an int4 weight of float `shape` grouped along `axis` (the values do not
    matter to the compiler)."""
    def part(per: int) -> tuple[int, ...]:
        return tuple(n // per if i == axis else n for i, n in enumerate(shape))

    return QuantizedWeight(jnp.zeros(part(2), jnp.uint8), jnp.ones(part(GROUP), jnp.float16))


def materialized(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """Fusion instructions (outside any fused computation) whose output is a float array of as many elements as
    the weight (the whole weight dequantized, in whatever layout)."""
    size = int(np.prod(shape))
    entry = hlo[hlo.index("ENTRY"):]
    found = []
    for line in entry.splitlines():
        m = re.search(r"= (f32|bf16|f16)\[([\d,]*)\]\S* fusion\(", line)
        if m and int(np.prod([int(n) for n in m.group(2).split(",") if n])) == size:
            found.append(line.strip()[:160])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--require-fused", action="store_true", help="exit 1 if a dequantized weight is written")
    args = parser.parse_args()
    c = preset(args.preset)
    E, H, D, F, V, k = (c.hidden_size, c.num_heads, c.head_dim, c.moe_intermediate_size, c.vocab_size,
                        c.num_experts_per_tok)
    cases = {  # name: (einsum, x shape, weight float shape, group axis)
        "attn.q": ("bte,ehd->bthd", (1, 1, E), (E, H, D), 0),
        "attn.o": ("bthd,hde->bte", (1, 1, H, D), (H, D, E), 1),
        "expert gate (k gathered)": ("nbe,nef->nbf", (k, 1, E), (k, E, F), 1),
        "expert down (k gathered)": ("nbf,nfe->nbe", (k, 1, F), (k, F, E), 1),
        "lm_head": ("...e,ev->...v", (1, E), (E, V), 0),
    }
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, preset {args.preset}")
    bad = 0
    for name, (spec, x_shape, w_shape, axis) in cases.items():
        x, w = jnp.zeros(x_shape, jnp.bfloat16), int4_weight(w_shape, axis)
        hlo = jax.jit(lambda x, w, spec=spec: einsum(spec, x, w)).lower(x, w).compile().as_text()
        copies = materialized(hlo, w_shape)
        bad += bool(copies)
        verdict = "MATERIALIZED (a float copy written, then read by the dot)" if copies else "fused into the dot"
        print(f"{name:26s} {str(w_shape):18s} {verdict}")
        for line in copies:
            print(f"    {line}")
    return 1 if bad and args.require_fused else 0


if __name__ == "__main__":
    sys.exit(main())
