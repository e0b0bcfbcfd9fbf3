"""Random-weight Hugging Face checkpoints for the tests; the comparison helpers live in qwen3moe_jax.tools.parity."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM


def save_hf_model(path: Path, seed: int, initializer_range: float = 0.1, **config) -> Qwen3MoeForCausalLM:
    """Random weights at a given shape, written with save_pretrained; returns the model in eval mode.

    A wider init than the default 0.02 makes next-token logits less flat, so greedy comparisons are not
    decided by ties at rounding level.
    """
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(initializer_range=initializer_range, **config)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model



def save_hf_dense_model(path: Path, seed: int, initializer_range: float = 0.1, **config) -> Qwen3ForCausalLM:
    """save_hf_model for a dense Qwen3 (Qwen3ForCausalLM, model_type "qwen3": a draft model's architecture)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(initializer_range=initializer_range, **config)).eval()
    model.save_pretrained(path)
    return model
