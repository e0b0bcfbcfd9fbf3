"""Comparison against Hugging Face transformers' Qwen3MoeForCausalLM (an independent implementation).

Needs the `test` extra (torch, transformers); imported only by the parity scripts and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen3MoeForCausalLM

import qwen3moe_jax as qj


@torch.no_grad()
def hf_logits(model: Qwen3MoeForCausalLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model: Qwen3MoeForCausalLM, ids: list[int], new_tokens: int) -> list[int]:
    # An explicit all-ones mask: without one, generate() treats prompt tokens equal to pad_token_id as padding.
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(ids):].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_with_transformers(path: str | Path, prompts: list[list[int]], new_tokens: int = 32) -> list[dict[str, Any]]:
    """Per prompt: max |logit error| over the prompt (f32) and where the greedy continuations first differ."""
    ours = qj.load(path, dtype="float32", progress=False,
                   max_seq_len=max(len(p) for p in prompts) + new_tokens)
    ref = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for ids in prompts:
        err = float(np.abs(ours.logits(ids) - hf_logits(ref, ids)).max())
        a = ours.generate(ids, max_new_tokens=new_tokens, stop_token_ids=[])
        b = hf_greedy(ref, ids, new_tokens)
        rows.append({"prompt_tokens": len(ids), "max_abs_logit_error": err,
                     "greedy_first_divergence": first_divergence(a, b), "greedy_tokens": len(a)})
    return rows
