"""Log-probabilities of given tokens, on the device: what a scoring prefill chunk adds to an ordinary one
(engine.prefill_chunk with targets), and the logits of a whole sequence in one pass (`full_logits`).

A scoring chunk runs the chunk as prefill does, then projects every position, not only the last, through lm_head:
position p's log-softmax gives the logprob of the prompt's token p + 1 (its target), the LOGPROBS_MAX most likely
tokens and their logprobs. The chosen logprob and the top ones come from the same log-softmax array, so a target
that is the argmax has exactly the top logprob (how a caller tells a greedy continuation).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qwen3moe_jax.model.cache import KVCache
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params
from qwen3moe_jax.model.sharding import constrain
from qwen3moe_jax.model.transformer import forward, lm_logits
from qwen3moe_jax.runtime.sampling import token_logprobs


def chunk_logprobs(params: Params, hidden: jax.Array, targets: jax.Array,
                   n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For hidden states [R, C, E] and the token after each position, targets [R, C]: (the targets' logprobs
    [R, C], the n most likely tokens [R, C, n] and their logprobs [R, C, n]), all under the model's own
    distribution (float32, before any sampling setting). Computed for every position; the caller keeps those it
    asked for."""
    R, C, _ = hidden.shape
    logits = constrain(lm_logits(params, hidden.reshape(R * C, -1)), (None, None))
    chosen, top_ids, top_logp = token_logprobs(logits, targets.reshape(R * C), min(n, logits.shape[-1]))
    out = (chosen.reshape(R, C), top_ids.astype(jnp.int32).reshape(R, C, -1), top_logp.reshape(R, C, -1))
    return tuple(constrain(a, (None,) * a.ndim) for a in out)  # on a mesh, every device holds the whole result


@partial(jax.jit, static_argnames="config")
def full_logits(params: Params, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits at every position of tokens [B, T] in one pass, with a scratch cache of length T."""
    B, T = tokens.shape
    cache = KVCache.init(config, B, T, params.embed.dtype)
    hidden, _, _ = forward(params, tokens, jnp.zeros(B, jnp.int32), cache, config)
    return constrain(lm_logits(params, hidden), (None, None, None))
