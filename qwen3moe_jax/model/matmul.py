"""The one matmul of the model (`einsum`), for float, int8 and int4 weights, and the C++ CPU kernel it hands a
decode step's small products to."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from qwen3moe_jax.model import backend, cpu_kernels
from qwen3moe_jax.model.quant import QuantizedWeight, dequantize
from qwen3moe_jax.model.sharding import mesh_sizes

Array = jax.Array


def einsum(spec: str, x: Array, w: Array | QuantizedWeight) -> Array:
    """The one matmul of the model. f32 asks for full f32 precision, so parity runs are not TF32 on GPU.

    An int8 QuantizedWeight is contracted as stored, its values converted to x's dtype (exact: bfloat16
    holds every integer up to 256), which on GPU XLA fuses into the matmul's read of the int8 operand.
    The per-channel scale then multiplies the float32 result, exact because it is constant along the
    contracted axes, before the one rounding to x's dtype.

    An int4 weight's scales vary along the contracted axis, so they cannot wait for the output. On a GPU the
    Pallas matmul reads it as stored (pallas_matmul.einsum_in_place), since XLA:GPU writes it out dequantized
    before its GEMM reads it (`qwen3moe-jax aot`: q, k, v, o and lm_head at every batch); elsewhere, and on a mesh,
    it is dequantized as the matmul's operand (int4_operand).
    """
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    if not isinstance(w, QuantizedWeight) and not mesh_sizes() and (form := cpu_kernels.matmul_form(spec, x, w)):
        M, K, N = form  # a decode step's product on the CPU: the C++ kernel streams w faster than XLA's dot
        out_shape = jax.eval_shape(partial(jnp.einsum, spec), x, w).shape
        return cpu_matmul(x.reshape(M, K), w.reshape(K, N)).reshape(out_shape)
    if isinstance(w, QuantizedWeight) and w.bits == 4:
        if backend.platform() == "gpu" and not mesh_sizes():
            from qwen3moe_jax.model.pallas_matmul import einsum_in_place  # Pallas loads only for int4 on a GPU

            if (y := einsum_in_place(spec, x, w)) is not None:
                return y
        w = int4_operand(w, x.dtype)
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x, w, precision=precision)
    y = jnp.einsum(spec, x, w.values.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)
    return (y * _scale_for_output(spec, w.scale)).astype(x.dtype)


@cpu_kernels.with_gradient_of(lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST))
def cpu_matmul(x: Array, w: Array) -> Array:
    return cpu_kernels.matmul(x, w)


def int4_operand(w: QuantizedWeight, dtype: Any) -> Array:
    """An int4 weight as a matmul operand in `dtype`: unpacked and s * q - m per group computed in float32
    (an asymmetric group's s * q and m may nearly cancel, which bfloat16 arithmetic would magnify), rounded
    once to `dtype`. Elementwise ops and broadcasts only, for XLA:GPU to fuse into the consuming dot's operand
    read, so that only the packed bytes and the scales come from memory. It does not (`qwen3moe-jax aot`), hence
    the Pallas path there. XLA:CPU fuses nothing into a dot: there the dequantized weight (of a gathered expert
    block, for the experts) is written by a fusion of its own and read by the dot."""
    return dequantize(w).astype(dtype)


def _scale_for_output(spec: str, scale: Array) -> Array:
    """A QuantizedWeight's scale (the weight's axes, contracted ones of size 1) laid out to broadcast
    against the output of einsum `spec`, e.g. "bte,ehd->bthd": scale [1, H, D] -> [1, 1, H, D]."""
    inputs, out = spec.split("->")
    w_axes, out_axes = inputs.split(",")[1], out.removeprefix("...")  # "..." only leads, on x and out
    kept = [a for a in w_axes if a in out_axes]
    assert kept == [a for a in out_axes if a in kept], f"{spec}: the output must keep the weight's axis order"
    s = jnp.squeeze(scale, [i for i, a in enumerate(w_axes) if a not in kept])  # the contracted axes
    return jnp.expand_dims(s, [i for i, a in enumerate(out_axes) if a not in kept])
