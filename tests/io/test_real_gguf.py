"""A real Qwen3-MoE GGUF (e.g. Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf), named by QWEN3_MOE_GGUF_PATH.

These read metadata, tokenizer and a sample of tensors only, so they run on a laptop; the full-model
comparison with llama.cpp is scripts/parity_check.py --against llama.cpp (it needs host memory for the
dequantized weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.gguf_file import GGUFTensors, gguf_name, read_gguf_config, read_gguf_tokenizer, to_gguf_layout
from qwen3moe_jax.model.params import named_leaves, param_specs
from tests.conftest import MIXED_TEXT

GGUF_PATH = os.environ.get("QWEN3_MOE_GGUF_PATH")
pytestmark = pytest.mark.skipif(
    not GGUF_PATH, reason="QWEN3_MOE_GGUF_PATH is unset (point it at a Qwen3-MoE GGUF file to run these)"
)
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)


@pytest.fixture(scope="module")
def tensors():
    return GGUFTensors(Path(GGUF_PATH))


def test_every_tensor_is_present_with_the_configs_shape(tensors):
    config = read_gguf_config(tensors)
    assert config.num_experts_per_tok <= config.num_experts and config.num_heads % config.num_kv_heads == 0
    for name, spec in named_leaves(param_specs(config)).items():
        tensor = tensors.tensors[gguf_name(name)]
        expected = to_gguf_layout(name, np.broadcast_to(np.float32(0), spec.shape)).shape  # no allocation
        assert tuple(reversed(tensor.shape.tolist())) == expected, name


@needs_llamacpp
def test_tokenizer_matches_llamacpp(tensors):
    ours = read_gguf_tokenizer(tensors)
    with llamacpp.LlamaCpp(GGUF_PATH, vocab_only=True) as reference:
        for text in [MIXED_TEXT, "<think>\nok\n</think>\n\n<tool_call>\n{}\n</tool_call>", "  def  f():\r\n\treturn 1"]:
            assert ours.encode(text) == reference.tokenize(text), text


def test_chat_template_renders_a_qwen_prompt(tensors):
    tokenizer = read_gguf_tokenizer(tensors)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert prompt.startswith("<|im_start|>") and "<|im_start|>assistant\n" in prompt
    ids = tokenizer.encode(prompt)
    assert tokenizer.token_id("<|im_start|>") in ids and tokenizer.decode(ids) == prompt


@needs_llamacpp
def test_each_tensor_type_dequantizes_as_ggml_does(tensors):
    """The smallest tensor of every type in the file, ours against ggml's own to_float."""
    smallest = {}
    for tensor in tensors.tensors.values():
        kind = tensor.tensor_type
        if kind not in smallest or tensor.n_elements < smallest[kind].n_elements:
            smallest[kind] = tensor
    for kind, tensor in smallest.items():
        shape = tuple(reversed(tensor.shape.tolist()))
        expected = llamacpp.ggml_dequantize(tensor.data, kind, shape)
        np.testing.assert_array_equal(tensors.get(tensor.name).reshape(shape), expected, err_msg=kind.name)
