"""What the MoE routers do: the load-balancing loss used in training, and per-layer routing statistics.

Both read the router logits that `transformer.forward` returns beside the hidden states. The jit steps that
serve generation drop those logits, so XLA never computes anything for them there: introspection is a
separate forward pass over the tokens of interest (a prompt, or a prompt and its completion), which
routes every position as generation did, up to float rounding, because attention is causal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.model.cache import KVCache
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.moe import top_k_routing
from qwen3moe_jax.model.params import Params
from qwen3moe_jax.model.transformer import forward


def load_balancing_loss(router_logits: Sequence[jax.Array | None], num_experts: int, top_k: int) -> jax.Array:
    """The Switch Transformer auxiliary loss as Qwen3-MoE training computes it (transformers'
    `load_balancing_loss_func`): num_experts * sum_x f_x * P_x, where f_x is the number of top-k
    assignments to expert x per token and P_x its mean router probability, both pooled over all MoE
    layers. It is top_k when routing is perfectly balanced and grows as it concentrates.

    router_logits: per layer [..., num_experts] (None entries, the dense layers, are skipped).
    """
    logits = jnp.concatenate([g.reshape(-1, num_experts) for g in router_logits if g is not None])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    assignments = jax.nn.one_hot(chosen, num_experts).sum(axis=(0, 1)) / logits.shape[0]
    return num_experts * jnp.sum(assignments * probs.mean(axis=0))


@dataclasses.dataclass(frozen=True)
class RouterStats:
    """How the routers treated a sequence of T tokens, for the L MoE layers listed in `layers`.

    experts [L, T, k] and weights [L, T, k]: the chosen experts and the weights their outputs were mixed
    with (renormalised when the config says so), best first; probs [L, T, X]: the router's full softmax.
    """

    layers: tuple[int, ...]
    experts: np.ndarray
    weights: np.ndarray
    probs: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """[L, X] how many tokens each expert received in each layer."""
        n = self.probs.shape[-1]
        return np.stack([np.bincount(e.reshape(-1), minlength=n) for e in self.experts])

    @property
    def entropy(self) -> np.ndarray:
        """[L, T] entropy of the router's distribution over experts, in nats (ln X when undecided)."""
        return _entropy(self.probs)

    @property
    def usage_entropy(self) -> np.ndarray:
        """[L] entropy of each layer's expert counts, normalised to 1.0 for perfectly even use."""
        return usage_entropy(self.counts)


def usage_entropy(counts: np.ndarray) -> np.ndarray:
    """Expert counts [..., experts] -> the entropy of their shares, normalised to 1.0 for perfectly even use
    (0.0 when one expert takes everything)."""
    return _entropy(counts / counts.sum(axis=-1, keepdims=True)) / np.log(counts.shape[-1])


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of distributions along the last axis (0 log 0 = 0)."""
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=-1)


@partial(jax.jit, static_argnames="config")
def _routing(params: Params, tokens: jax.Array, config: ModelConfig) -> tuple[list, list, list]:
    cache = KVCache.init(config, 1, tokens.shape[1], params.embed.dtype)
    _, _, logits = forward(params, tokens, jnp.zeros(1, jnp.int32), cache, config)
    moe_logits = [g[0] for g in logits if g is not None]
    weights, experts = zip(*(top_k_routing(g, config) for g in moe_logits), strict=True)
    return list(experts), list(weights), [jax.nn.softmax(g, axis=-1) for g in moe_logits]


def router_stats(params: Params, config: ModelConfig, tokens: np.ndarray, n: int) -> RouterStats:
    """RouterStats of the first n of tokens [1, T] through one forward pass (T may include padding, which
    causal attention keeps from touching the first n positions)."""
    experts, weights, probs = _routing(params, jnp.asarray(tokens, jnp.int32), config)
    layers = tuple(i for i in range(config.num_layers) if config.is_moe_layer(i))
    return RouterStats(layers, *(np.stack([np.asarray(a[:n]) for a in arrays]) for arrays in (experts, weights, probs)))
