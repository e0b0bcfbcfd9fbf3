"""Comparison against Hugging Face transformers' Qwen3MoeForCausalLM (an independent implementation).

The transformers functions need the `test` extra (torch, transformers), imported when called; the
llama.cpp side is in qwen3moe_jax.llamacpp. Used by the parity scripts and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import qwen3moe_jax as qj


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of a transformers Qwen3MoeForCausalLM."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    # An explicit all-ones mask: without one, generate() treats prompt tokens equal to pad_token_id as padding.
    prompt = torch.tensor([ids])
    with torch.no_grad():
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
    import torch
    from transformers import Qwen3MoeForCausalLM

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


def compare_with_llamacpp(path: str | Path, prompts: list[str], new_tokens: int = 32, dtype: str = "float32",
                          progress: bool = True) -> list[dict[str, Any]]:
    """Per text prompt, on one GGUF file: whether both tokenize it alike, the max |logit error| at its last
    position, where the greedy continuations first differ, and, along llama.cpp's greedy path, the mean
    |logit error| and how often our argmax picks llama.cpp's token."""
    from qwen3moe_jax.llamacpp import LlamaCpp

    ours = qj.load(path, dtype=dtype, progress=progress, max_seq_len=4096)
    if ours.tokenizer is None:
        raise qj.CheckpointError(f"{path} has no tokenizer; the comparison starts from text")
    rows = []
    encoded = [ours.tokenizer.encode(prompt) for prompt in prompts]
    with LlamaCpp(path, n_ctx=max(map(len, encoded)) + new_tokens + 1) as ref:
        for prompt, ids in zip(prompts, encoded, strict=True):
            theirs_greedy = ref.greedy(ids, new_tokens)
            path_ids = ids + theirs_greedy
            theirs = ref.logits(path_ids)[len(ids) - 1: -1]
            mine = ours.logits(path_ids)[len(ids) - 1: -1]
            rows.append({
                "prompt": prompt, "prompt_tokens": len(ids), "tokens_match": ids == ref.tokenize(prompt),
                "last_max_abs_logit_error": float(np.abs(mine[0] - theirs[0]).max()),
                "path_mean_abs_logit_error": float(np.abs(mine - theirs).mean()),
                "path_argmax_agreement": float(np.mean(mine.argmax(-1) == np.array(theirs_greedy))),
                "greedy_first_divergence": first_divergence(ours.generate(ids, new_tokens, stop_token_ids=[]),
                                                            theirs_greedy),
            })
    return rows
