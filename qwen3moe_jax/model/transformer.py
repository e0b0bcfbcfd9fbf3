"""Qwen3-MoE as pure functions over a params pytree (params.py).

The math follows transformers' `modeling_qwen3_moe` and llama.cpp's `qwen3moe`:
  x = embed[tokens]
  per layer:  h = x + Attention(RMSNorm(x));  x = h + MoE-or-MLP(RMSNorm(h))
  logits = RMSNorm(x) @ lm_head          (lm_head = embed.T when the embeddings are tied)

Attention and the dense MLP are here; the MoE block is moe.py, every projection matmul.py's `einsum`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3moe_jax.model.cache import CACHE_AXES, KVCache
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.matmul import einsum
from qwen3moe_jax.model.moe import moe
from qwen3moe_jax.model.params import AttentionParams, MLPParams, MoEParams, Params
from qwen3moe_jax.model.sharding import constrain

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in f32 and cast back before the weight multiply, as transformers does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in the rotate-half (NEOX) form. x: [B, T, heads, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(
    p: AttentionParams,
    x: Array,
    positions: Array,
    k_cache: Array,
    v_cache: Array,
    config: ModelConfig,
    window: int,
) -> tuple[Array, Array, Array]:
    """Causal GQA attention of x [B, T, E] at `positions` [B, T] over the cache [B, KV, S, D].

    The new keys and values are written into the cache at their positions first; a query at position
    p then attends to cache slots 0..p. Slots beyond p may hold stale or padding entries: the mask
    hides them, which is what lets one preallocated buffer serve every request and length.
    Only the first `window` slots are read (the caller guarantees every position is below it): a
    decode step early in a long cache then reads what is filled, not the whole buffer.
    """
    B, T, _ = x.shape
    eps = config.rms_norm_eps
    q = rms_norm(einsum("bte,ehd->bthd", x, p.q), p.q_norm, eps)
    k = rms_norm(einsum("bte,ehd->bthd", x, p.k), p.k_norm, eps)
    v = einsum("bte,ehd->bthd", x, p.v)
    q = rotary(q, positions, config.rope_theta)
    k = rotary(k, positions, config.rope_theta)

    start = positions[:, 0]
    # On a mesh the cache keeps its input sharding, so the donated buffer is reused step after step.
    k_cache = constrain(write_cache(k_cache, k.transpose(0, 2, 1, 3), start), CACHE_AXES)
    v_cache = constrain(write_cache(v_cache, v.transpose(0, 2, 1, 3), start), CACHE_AXES)

    keys, values = k_cache[:, :, :window], v_cache[:, :, :window]
    q = q.reshape(B, T, config.num_kv_heads, config.q_per_kv, config.head_dim)
    scores = einsum("btkgd,bksd->bkgts", q, keys) * (config.head_dim**-0.5)
    slots = jnp.arange(window)
    visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, window]
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = einsum("bkgts,bksd->btkgd", probs, values).reshape(B, T, config.num_heads, config.head_dim)
    return einsum("bthd,hde->bte", out, p.o), k_cache, v_cache


def write_cache(cache: Array, new: Array, start: Array) -> Array:
    """Write new [B, KV, T, D] into cache [B, KV, S, D] at slots start[b] .. start[b]+T-1 of each row.

    Slots at or past S are dropped, not clamped: the engine parks rows that must not change (free rows,
    rows part-way through their prompt) at position S, and a prompt's last chunk may run past the end."""
    B, _, T, _ = new.shape
    slots = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # [B, T]
    return cache.at[jnp.arange(B)[:, None], :, slots].set(new.transpose(0, 2, 1, 3), mode="drop")


def mlp(p: MLPParams, x: Array) -> Array:
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""
    h = jax.nn.silu(einsum("bte,ef->btf", x, p.gate)) * einsum("bte,ef->btf", x, p.up)
    return einsum("btf,fe->bte", h, p.down)


def forward(
    params: Params, tokens: Array, start: Array, cache: KVCache, config: ModelConfig, window: int | None = None
) -> tuple[Array, KVCache, list[Array | None]]:
    """Run tokens [B, T] placed at positions start[b] .. start[b]+T-1.

    Returns the final-normed hidden states, the updated cache and, per layer, the router logits
    [B, T, experts] (None for a dense layer). Callers that drop the router logits pay nothing for them:
    jit removes outputs nobody reads. The caller guarantees start + T <= cache length
    for the tokens whose keys matter (slots past the cache are dropped) and, with a `window` (a static
    attention span; default the whole cache), start + T <= window for the tokens whose outputs matter.
    """
    T = tokens.shape[1]
    window = cache.max_len if window is None else window
    positions = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]
    x = params.embed[tokens]
    new_k, new_v, router_logits = [], [], []
    for i, layer in enumerate(params.layers):
        h, k_i, v_i = attention(
            layer.attn, rms_norm(x, layer.attn_norm, config.rms_norm_eps), positions,
            cache.k[i], cache.v[i], config, window,
        )
        x = x + h
        y = rms_norm(x, layer.mlp_norm, config.rms_norm_eps)
        if isinstance(layer.mlp, MoEParams):
            h, logits = moe(layer.mlp, y, config)
        else:
            h, logits = mlp(layer.mlp, y), None
        x = x + h
        new_k.append(k_i)
        new_v.append(v_i)
        router_logits.append(logits)
    return rms_norm(x, params.final_norm, config.rms_norm_eps), KVCache(k=new_k, v=new_v), router_logits


def lm_logits(params: Params, hidden: Array) -> Array:
    """Project final hidden states [..., E] to float32 logits [..., V]."""
    if params.lm_head is None:
        logits = einsum("...e,ve->...v", hidden, params.embed)
    else:
        logits = einsum("...e,ev->...v", hidden, params.lm_head)
    return logits.astype(jnp.float32)
