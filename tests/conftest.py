"""Shared fixtures: small random-weight Hugging Face Qwen3-MoE checkpoints written with save_pretrained."""

from __future__ import annotations

import os

# The suite compares against CPU references and must behave the same on a GPU machine: pin it to CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.hf_reference import save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """One small odd-shaped checkpoint (GQA 2, head_dim != hidden/heads, a dense layer) and its HF model."""
    path = tmp_path_factory.mktemp("hf_tiny")
    model = save_hf_model(
        path, seed=1, hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, mlp_only_layers=[1], norm_topk_prob=True, vocab_size=300,
    )
    return path, model
