"""PAR-1: our logits and greedy tokens equal Hugging Face transformers' on the same checkpoint (f32)."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.model.moe import MOE_KERNELS
from qwen3moe_jax.tools.parity import hf_greedy, hf_logits
from tests.hf_reference import save_hf_model

# Odd shapes on purpose: head_dim != hidden/heads, GQA ratios 1, 2, 3 and 8, norm_topk_prob on and off,
# tied and untied embeddings, dense layers (by mlp_only_layers and by decoder_sparse_step), top-k 1..4.
SHAPES = {
    "gqa1-headdim20-top2-norm": dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=20, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        tie_word_embeddings=False, vocab_size=256,
    ),
    "gqa2-tied-dense-layer-top1": dict(
        hidden_size=40, num_attention_heads=6, num_key_value_heads=3, head_dim=8, num_hidden_layers=3,
        num_experts=5, num_experts_per_tok=1, moe_intermediate_size=24, intermediate_size=56,
        mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=True, vocab_size=211,
    ),
    "gqa3-sparse-step2-top3-theta1e6": dict(
        hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, intermediate_size=72,
        decoder_sparse_step=2, norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        vocab_size=300,
    ),
    "gqa8-tied-16experts-top4-norm": dict(
        hidden_size=32, num_attention_heads=8, num_key_value_heads=1, head_dim=32, num_hidden_layers=2,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, norm_topk_prob=True,
        tie_word_embeddings=True, vocab_size=190,
    ),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_and_greedy_match_transformers(name, tmp_path):
    """PAR-1 on a random-weight checkpoint saved with save_pretrained and loaded through qj.load."""
    hf = save_hf_model(tmp_path, seed=len(name), **SHAPES[name])
    model = qj.load(tmp_path, dtype="float32", max_seq_len=128, progress=False)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=37).tolist()  # crosses the 16 and 32 buckets
    ours, ref = model.logits(ids), hf_logits(hf, ids)
    assert ours.shape == ref.shape == (37, model.config.vocab_size)
    assert ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    print(f"PAR-1 {name}: max |logit error| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)

    prompt = [0, *ids[:6]]  # token 0 on purpose: it is also the pad id the reference generate() is given
    ours_greedy = model.generate(prompt, max_new_tokens=32, stop_token_ids=[])
    assert ours_greedy == hf_greedy(hf, prompt, 32)


@pytest.mark.parametrize("kernel", MOE_KERNELS)
def test_every_moe_kernel_matches_transformers(kernel, tmp_path):
    """Each MoE kernel (the Pallas one interpreted on the CPU) gives transformers' logits over a 37-token prompt
    (prefill: many rows per expert) and its greedy tokens (decode: one row, few experts). Two MoE layers of 16
    experts, top 4, and a width (20) that is no power of two."""
    shape = dict(SHAPES["gqa8-tied-16experts-top4-norm"], moe_intermediate_size=20)
    hf = save_hf_model(tmp_path, seed=7, **shape)
    model = qj.load(tmp_path, dtype="float32", max_seq_len=64, progress=False, moe_kernel=kernel)
    assert model.config.moe_kernel == kernel

    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=37).tolist()
    np.testing.assert_allclose(model.logits(ids), hf_logits(hf, ids), atol=2e-5, rtol=1e-5)
    prompt = [0, *ids[:5]]
    assert model.generate(prompt, max_new_tokens=12, stop_token_ids=[]) == hf_greedy(hf, prompt, 12)


def test_an_unknown_moe_kernel_is_a_config_error():
    with pytest.raises(qj.ConfigError, match="moe_kernel must be one of auto, gather"):
        qj.load(None, moe_kernel="dense")
    with pytest.raises(qj.ConfigError, match="moe_kernel"):
        qj.random_model("tiny", moe_kernel="")
