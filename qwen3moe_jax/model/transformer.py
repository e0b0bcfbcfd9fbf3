"""Qwen3-MoE as pure functions over a params pytree (params.py).

The math follows transformers' `modeling_qwen3_moe` and llama.cpp's `qwen3moe`:
  x = embed[tokens]
  per layer:  h = x + Attention(RMSNorm(x));  x = h + MoE-or-MLP(RMSNorm(h))
  logits = RMSNorm(x) @ lm_head          (lm_head = embed.T when the embeddings are tied)

Attention and the dense MLP are here; the MoE block is moe.py, every projection matmul.py's `einsum`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwen3moe_jax.model.cache import CACHE_AXES, SCALE_AXES, KVCache, quantize_kv, rotate_keys
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


def rope_frequencies(config: ModelConfig) -> tuple[Array, float]:
    """The rotary inverse frequencies [head_dim / 2] (float32) and the factor cos and sin are multiplied by, computed
    as transformers computes them (float32 powers of rope_theta; YaRN as in its `_compute_yarn_parameters`)."""
    d = config.head_dim
    powers = config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    yarn = config.rope_scaling
    if yarn is None:
        return 1.0 / powers, 1.0

    def dimension(rotations: float) -> float:  # the frequency that turns `rotations` times over the original context
        return d * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(
            config.rope_theta))

    low, high = max(math.floor(dimension(yarn.beta_fast)), 0), min(math.ceil(dimension(yarn.beta_slow)), d - 1)
    # 1 where a frequency is kept (fast: many turns over the original context), 0 where divided by the factor.
    kept = 1 - jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low if high != low else 0.001), 0, 1)
    return 1.0 / (yarn.factor * powers) * (1 - kept) + 1.0 / powers * kept, yarn.scale


def rotary(x: Array, positions: Array, config: ModelConfig) -> Array:
    """Rotary embedding in the rotate-half (NEOX) form. x: [B, T, heads, D]; positions: [B, T]."""
    inv_freq, scale = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:  # YaRN's attention factor, on both q and k as transformers applies it
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(
    p: AttentionParams,
    x: Array,
    positions: Array,
    layer: KVCache,
    config: ModelConfig,
    window: int,
) -> tuple[Array, KVCache]:
    """Causal GQA attention of x [B, T, E] at `positions` [B, T] over one layer's cache [B, KV, S, D] (a KVCache
    of one layer: lists of one array), and that layer's cache with the new keys and values written.

    The new keys and values are written into the cache at their positions first; a query at position
    p then attends to cache slots 0..p. Slots beyond p may hold stale or padding entries: the mask
    hides them, which is what lets one preallocated buffer serve every request and length.
    Only the first `window` slots are read (the caller guarantees every position is below it): a
    decode step early in a long cache then reads what is filled, not the whole buffer.
    An int8 cache holds keys rotated by cache.key_rotation, an orthogonal matrix, and the queries are rotated alike:
    q.k is unchanged, and the key's int8 error smaller where a few channels dominate it (values are not rotated:
    measured, they have no such channels, and rotating them did not lower their error).
    """
    B, T, _ = x.shape
    eps = config.rms_norm_eps
    q = rms_norm(einsum("bte,ehd->bthd", x, p.q), p.q_norm, eps)
    k = rms_norm(einsum("bte,ehd->bthd", x, p.k), p.k_norm, eps)
    v = einsum("bte,ehd->bthd", x, p.v)
    q = rotary(q, positions, config)
    k = rotary(k, positions, config)

    start = positions[:, 0]
    # On a mesh the cache keeps its input sharding, so the donated buffer is reused step after step.
    def write(cache: Array, new: Array, axes: tuple[str, ...]) -> Array:
        return constrain(write_cache(cache, jnp.moveaxis(new, 1, 2), start), axes)

    if layer.k_scale is None:
        layer = KVCache([write(layer.k[0], k, CACHE_AXES)], [write(layer.v[0], v, CACHE_AXES)])
    else:  # int8: each new key and value quantized once, as it is written; keys (and queries) rotated first
        q, k = rotate_keys(q), rotate_keys(k.astype(jnp.float32))  # the keys quantized from float32
        (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
        layer = KVCache([write(layer.k[0], k, CACHE_AXES)], [write(layer.v[0], v, CACHE_AXES)],
                        [write(layer.k_scale[0], k_scale, SCALE_AXES)], [write(layer.v_scale[0], v_scale, SCALE_AXES)])

    q = q.reshape(B, T, config.num_kv_heads, config.q_per_kv, config.head_dim)
    seen = jax.tree.map(lambda a: a[:, :, :window], layer)
    out = attend(q, seen.k[0], seen.v[0], positions, config.head_dim**-0.5,
                 *(() if seen.k_scale is None else (seen.k_scale[0], seen.v_scale[0])))
    return einsum("bthd,hde->bte", out.reshape(B, T, config.num_heads, config.head_dim), p.o), layer


# Attention reads the cache in blocks of this many slots (also the smallest window: below it, reading the whole
# span costs less than another compile). Each block is reduced on its own and the blocks' sums are added in a fixed
# pairwise order, where a block past a row's position adds exact zeros: a row's result is the same bits whatever
# window the step reads (the one its longest row needs).
ATTENTION_BLOCK = 256


def attention_window(filled: int, max_len: int) -> int:
    """The cache slots a step reads when `filled` slots (its own tokens included) hold keys: a power of two up to
    2,048 (where a window costs little beside the rest of a step), then four sizes an octave (2,560, 3,072, 3,584,
    4,096, 5,120, ...), so a long prompt's chunk reads at most a quarter more than it needs (a chunk up to 2,560
    reads 2,560 slots, not 4,096) for a few more compiles."""
    if filled <= 8 * ATTENTION_BLOCK:
        return min(max(ATTENTION_BLOCK, 1 << (filled - 1).bit_length()), max_len)
    step = 1 << ((filled - 1).bit_length() - 3)
    return min(-(-filled // step) * step, max_len)


def attend(q: Array, keys: Array, values: Array, positions: Array, scale: float, k_scale: Array | None = None,
           v_scale: Array | None = None) -> Array:
    """Causal softmax attention of queries q [B, T, KV, G, D] at `positions` [B, T] over keys and values
    [B, KV, W, D] (slot s visible from position p when s <= p), in blocks of ATTENTION_BLOCK slots. int8 keys and
    values come with their scales [B, KV, W]: a key's scale multiplies its scores, a value's its probabilities (a
    scale per slot factors out of the sum over head_dim), so no dequantized copy of the window is made.

    The scores are rounded as transformers rounds them (q . k in the model's dtype, the softmax in float32), but
    the softmax is normalised after the probability-weighted values are summed, in float32: each block's
    exp(score - max) and its share of the output, then the blocks added in a tree over a power-of-two count of
    blocks (the missing ones exact zeros). The max is exact in any order, a masked slot's weight is exactly 0, and
    x + 0 == x, so blocks a row cannot see change none of its bits. Every sum is a batched matmul in canonical
    form (batch axes first) or an explicit tree of additions, because XLA:CPU's reductions and dots in other
    layouts round differently as the block count changes (measured)."""
    B, T, KV, G, D = q.shape
    W = keys.shape[2]
    # A window below one block is the whole cache (there is no other window): one block, padded to a power of two.
    block = min(ATTENTION_BLOCK, 1 << (W - 1).bit_length())
    n = -(-W // block)
    if n * block > W:  # pad to whole blocks: padding slots are past every position
        pad = ((0, 0), (0, 0), (0, n * block - W), (0, 0))
        keys, values = jnp.pad(keys, pad), jnp.pad(values, pad)
        if k_scale is not None:
            k_scale, v_scale = jnp.pad(k_scale, pad[:3]), jnp.pad(v_scale, pad[:3])
    # Queries as rows g*T + t against each block's keys: scores [B, KV, n, G*T, block], so each block is reduced
    # where it lies (transposing the scores into blocks cost more than the rest of attention, past 2,048 slots).
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    rows = q.transpose(0, 2, 3, 1, 4).reshape(B, KV, 1, G * T, D)
    blocks = lambda a: a.reshape(B, KV, n, block, *a.shape[3:])  # noqa: E731
    scores = jnp.matmul(rows, jnp.swapaxes(blocks(keys.astype(q.dtype)), -1, -2), precision=precision) * scale
    if k_scale is not None:
        scores = scores.astype(jnp.float32) * blocks(k_scale.astype(jnp.float32))[:, :, :, None, :]
    row_positions = jnp.broadcast_to(positions[:, None, :], (B, G, T)).reshape(B, 1, 1, G * T, 1)
    visible = jnp.arange(n * block).reshape(n, 1, block) <= row_positions  # [B, 1, n, G*T, block]
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    top = jnp.max(scores, axis=(2, 4), keepdims=True)  # exact in any order
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0))  # [B, KV, n, G*T, block]
    total = _pairwise_sum(_pairwise_sum(weights, axis=-1), axis=2)  # [B, KV, G*T]
    if v_scale is not None:  # masked slots keep weight 0
        weights = weights * blocks(v_scale.astype(jnp.float32))[:, :, :, None, :]
    parts = jnp.matmul(weights.astype(q.dtype), blocks(values.astype(q.dtype)),
                       precision=precision, preferred_element_type=jnp.float32)  # [B, KV, n, G*T, D]
    out = _pairwise_sum(parts, axis=2) / total[..., None]
    return out.reshape(B, KV, G, T, D).transpose(0, 3, 1, 2, 4).astype(q.dtype)


def _pairwise_sum(x: Array, axis: int) -> Array:
    """The sum over `axis` as a fixed tree over the next power of two of its length (the missing terms exact
    zeros, as masked blocks would add): neighbours added pairwise, level by level. A window of 10 blocks is so
    summed as the 16-block window summed them, without computing 6 blocks of nothing."""
    missing = (1 << (x.shape[axis] - 1).bit_length()) - x.shape[axis]
    if missing:
        x = jnp.concatenate([x, jnp.zeros(x.shape[:axis] + (missing,) + x.shape[axis + 1:], x.dtype)], axis)
    while x.shape[axis] > 1:
        x = jax.lax.slice_in_dim(x, 0, None, 2, axis) + jax.lax.slice_in_dim(x, 1, None, 2, axis)
    return jnp.squeeze(x, axis)


def write_cache(cache: Array, new: Array, start: Array) -> Array:
    """Write new [B, KV, T, ...] into cache [B, KV, S, ...] at slots start[b] .. start[b]+T-1 of each row.

    Slots at or past S are dropped, not clamped: the engine parks rows that must not change (free rows,
    rows part-way through their prompt) at position S, and a prompt's last chunk may run past the end."""
    B, _, T = new.shape[:3]
    slots = start[:, None] + jnp.arange(T, dtype=start.dtype)[None, :]  # [B, T]
    return cache.at[jnp.arange(B)[:, None], :, slots].set(jnp.moveaxis(new, 2, 1), mode="drop")


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
    layers, router_logits = [], []
    for i, layer in enumerate(params.layers):
        h, cache_i = attention(layer.attn, rms_norm(x, layer.attn_norm, config.rms_norm_eps), positions,
                               cache.layer(i), config, window)
        x = x + h
        y = rms_norm(x, layer.mlp_norm, config.rms_norm_eps)
        if isinstance(layer.mlp, MoEParams):
            h, logits = moe(layer.mlp, y, config)
        else:
            h, logits = mlp(layer.mlp, y), None
        x = x + h
        layers.append(cache_i)
        router_logits.append(logits)
    return rms_norm(x, params.final_norm, config.rms_norm_eps), KVCache.join(layers), router_logits


def lm_logits(params: Params, hidden: Array) -> Array:
    """Project final hidden states [..., E] to float32 logits [..., V]."""
    if params.lm_head is None:
        logits = einsum("...e,ve->...v", hidden, params.embed)
    else:
        logits = einsum("...e,ev->...v", hidden, params.lm_head)
    return logits.astype(jnp.float32)
