"""Router introspection and the MoE expert kernels: the blocked CPU form against ragged_dot, routing
statistics against transformers' router logits, and the load-balancing loss against transformers' own."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

import qwen3moe_jax as qj
from qwen3moe_jax.model.moe_kernels import experts_swiglu_blocked, experts_swiglu_ragged
from qwen3moe_jax.model.params import MoEParams
from qwen3moe_jax.model.router_stats import RouterStats, load_balancing_loss


@pytest.mark.parametrize("rows, sizes", [
    (3, [0, 2, 0, 0, 1, 0]),  # a decode step: few rows, most experts empty
    (40, [10, 0, 7, 13, 0, 10]),
    (64, [64, 0, 0, 0, 0, 0]),  # everything to one expert
    (257, [50, 1, 90, 0, 16, 100]),
])
def test_blocked_experts_equal_ragged_dot(rows, sizes):
    rng = np.random.default_rng(rows)
    X, E, F = 6, 16, 8
    p = MoEParams(router=None, gate=jnp.asarray(rng.normal(size=(X, E, F)), jnp.float32),
                  up=jnp.asarray(rng.normal(size=(X, E, F)), jnp.float32),
                  down=jnp.asarray(rng.normal(size=(X, F, E)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(rows, E)), jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)
    row_expert = jnp.repeat(jnp.arange(X), sizes, total_repeat_length=rows)
    blocked = experts_swiglu_blocked(p, x, row_expert, sizes)
    ragged = experts_swiglu_ragged(p, x, row_expert, sizes)
    np.testing.assert_allclose(blocked, ragged, rtol=1e-5, atol=1e-4)


def test_router_stats_match_transformers_router_logits(hf_tiny):
    path, hf_model = hf_tiny
    model = qj.load(path, progress=False)
    ids = list(np.random.default_rng(0).integers(0, model.config.vocab_size, 37))
    stats = model.router_stats(ids)
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_router_logits=True)
    hf_logits = [g.float().numpy().reshape(len(ids), -1) for g in out.router_logits]
    assert stats.layers == (0, 2)  # layer 1 is dense in hf_tiny
    assert len(hf_logits) == len(stats.layers)
    for row, reference in enumerate(hf_logits):
        probs = np.exp(reference - reference.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(stats.probs[row], probs, atol=1e-5)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
        np.testing.assert_array_equal(stats.experts[row], top)
        expected_weights = np.take_along_axis(probs, top, -1)
        np.testing.assert_allclose(stats.weights[row], expected_weights / expected_weights.sum(-1, keepdims=True),
                                   atol=1e-5)


def test_router_stats_summaries():
    model = qj.random_model("tiny", std=0.3)
    stats = model.router_stats("def f(x):\n    return x * 2\n")
    T, k, X = stats.experts.shape[1], model.config.num_experts_per_tok, model.config.num_experts
    counts = np.stack([np.bincount(e.ravel(), minlength=X) for e in stats.experts])
    np.testing.assert_array_equal(stats.counts, counts)
    assert (stats.counts.sum(-1) == T * k).all()
    p = stats.probs
    np.testing.assert_allclose(stats.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5)
    assert ((0 <= stats.usage_entropy) & (stats.usage_entropy <= 1)).all()
    even = RouterStats((0,), np.tile(np.arange(X), (1, 1, 1)), np.ones((1, 1, X)), np.ones((1, 1, X)) / X)
    np.testing.assert_allclose(even.usage_entropy, [1.0])


@pytest.mark.parametrize("skewed", [False, True])
def test_load_balancing_loss_matches_transformers(skewed):
    rng = np.random.default_rng(int(skewed))
    X, k = 8, 2
    layers = [rng.normal(size=(30, X)).astype(np.float32) for _ in range(3)]
    if skewed:  # one expert favoured everywhere: the loss rises above its balanced value k
        layers = [g + 4.0 * (np.arange(X) == 3) for g in layers]
    ours = float(load_balancing_loss([jnp.asarray(g) for g in layers] + [None], X, k))
    theirs = float(load_balancing_loss_func(tuple(torch.tensor(g) for g in layers), X, k))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert (ours > 3 * k) == skewed
