"""Model math: shapes and dtypes (chex), rotary properties, MoE against a per-token numpy reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.model.moe import moe
from qwen3moe_jax.model.params import MLPParams, MoEParams, ParamSpec, init_params, param_count, param_specs
from qwen3moe_jax.model.transformer import forward, rotary
from qwen3moe_jax.runtime.engine import full_logits


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_shapes_and_dtypes(dtype):
    config = qj.preset("tiny")
    params = init_params(config, 0, dtype)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params,
        jax.tree.map(lambda s: jnp.zeros(s.shape, dtype), param_specs(config),
                     is_leaf=lambda x: isinstance(x, ParamSpec)),
    )
    assert isinstance(params.layers[2].mlp, MLPParams)  # tiny's mlp_only_layers = [2]
    assert isinstance(params.layers[0].mlp, MoEParams)
    cache = qj.KVCache.init(config, batch_size=2, max_len=32, dtype=dtype)
    tokens = jnp.ones((2, 5), jnp.int32)
    hidden, cache, router_logits = jax.jit(forward, static_argnames="config")(
        params, tokens, jnp.array([0, 3], jnp.int32), cache, config
    )
    chex.assert_shape(hidden, (2, 5, config.hidden_size))
    chex.assert_type(hidden, dtype)
    assert router_logits[2] is None  # the dense layer
    chex.assert_shape([router_logits[0], router_logits[1]], (2, 5, config.num_experts))
    chex.assert_type([router_logits[0], router_logits[1]], jnp.float32)
    chex.assert_shape(cache.k + cache.v, (2, config.num_kv_heads, 32, config.head_dim))
    chex.assert_type(cache.k + cache.v, dtype)
    logits = full_logits(params, tokens, config)
    chex.assert_shape(logits, (2, 5, config.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


def test_bfloat16_tracks_float32():
    """bf16 is the fast path: same weights, logits close to the f32 run. The bound is on the mean: where
    rounding flips a router's choice of expert, single logits move by far more (up to ~1/3 of the logit
    scale for about one seed in three of this random model)."""
    f32 = qj.random_model("tiny", "float32", std=0.2)
    bf16 = qj.Model(f32.config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), f32.params), None)
    ids = list(range(40, 60))
    a, b = f32.logits(ids), bf16.logits(ids)
    assert b.dtype == np.float32
    assert np.abs(a - b).mean() < 0.03 * np.abs(a).max()
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.8


def test_rotary_preserves_norms_and_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def at(x, p):
        return rotary(x, jnp.array([[p]]), qj.preset("tiny").replace(head_dim=16, rope_theta=1e4))[0, 0, 0]

    np.testing.assert_allclose(jnp.linalg.norm(at(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(jnp.dot(at(q, 10), at(k, 3)), jnp.dot(at(q, 107), at(k, 100)), rtol=1e-4)
    np.testing.assert_allclose(at(q, 0), q[0, 0, 0])  # position 0 is the identity


def _numpy_moe(p, x, k, norm_topk):
    """Per token, per chosen expert, in float64: the definition, with no grouping or sorting."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = np.zeros_like(x, np.float64)
    for t, row in enumerate(x.astype(np.float64)):
        logits = row @ p.router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:k]
        weights = probs[chosen] / (probs[chosen].sum() if norm_topk else 1.0)
        for e, w in zip(chosen, weights, strict=True):
            gate = row @ p.gate[e]
            hidden = gate / (1 + np.exp(-gate)) * (row @ p.up[e])
            out[t] += w * (hidden @ p.down[e])
    return out


@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_grouped_matmul_matches_per_token_reference(norm_topk):
    config = qj.preset("tiny").replace(num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk)
    params = init_params(config, 1, std=0.3)
    x = np.random.default_rng(2).normal(size=(1, 50, config.hidden_size)).astype(np.float32)
    ours, _ = moe(params.layers[0].mlp, jnp.asarray(x), config)
    ours = ours[0]
    ref = _numpy_moe(params.layers[0].mlp, x[0], 3, norm_topk)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_preset_sizes_match_the_published_parameter_counts():
    """Qwen's model cards: 30.5B total / 3.3B active (30B-A3B); 235B total / 22B active (235B-A22B)."""
    for name, total_b, active_b in [("qwen3-30b-a3b", 30.5, 3.3), ("qwen3-coder-30b-a3b", 30.5, 3.3),
                                    ("qwen3-235b-a22b", 235.0, 22.0)]:
        total, active = param_count(qj.preset(name))
        assert abs(total / 1e9 - total_b) / total_b < 0.01, (name, total)
        assert abs(active / 1e9 - active_b) / active_b < 0.03, (name, active)
