"""The independent reference: Hugging Face transformers' Qwen3MoeForCausalLM on CPU in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


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


@torch.no_grad()
def hf_logits(model: Qwen3MoeForCausalLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model: Qwen3MoeForCausalLM, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(ids):].tolist()
