"""Shared fixtures: small random-weight Hugging Face Qwen3-MoE checkpoints written with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

# The suite compares against CPU references and must behave the same on a GPU machine: pin it to CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices, for the sharding tests' meshes (everything else runs on the first one).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The CLI's persistent compilation cache stays out of the user's home: off, unless a test points it at a tmp dir.
os.environ.setdefault("QWEN3MOE_JAX_COMPILE_CACHE", "off")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """One small odd-shaped checkpoint (GQA 2, head_dim != hidden/heads, a dense layer) and its HF model."""
    from tests.hf_reference import save_hf_model  # torch and transformers load only for the tests that use them

    path = tmp_path_factory.mktemp("hf_tiny")
    model = save_hf_model(
        path, seed=1, hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, mlp_only_layers=[1], norm_topk_prob=True, vocab_size=300,
    )
    return path, model


# Text that exercises every branch of the pre-tokenizer and byte-level decoding: code, whitespace runs,
# contractions, digits, CJK, accents, emoji (including a ZWJ sequence) and special tokens.
MIXED_TEXT = (
    "def add(a, b):\n    return a + b  # 加法\n\n\n日本語のテキスト、中文文本。 I'm sure it's 3.14159!\t"
    "café naïve résumé — 😀🚀👩‍💻 <|im_start|>user\nhello<|im_end|>\n<|endoftext|>  trailing  "
)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real byte-level BPE vocabulary (512 tokens) learned from a small mixed-language corpus."""
    from qwen3moe_jax.io.tokenizer import Tokenizer

    corpus = (Path(__file__).parent / "data" / "corpus.txt").read_text()
    return Tokenizer.train(corpus.splitlines(keepends=True), vocab_size=512)


def finish_gguf(writer) -> None:
    """Write out a gguf.GGUFWriter the tests filled by hand (header, metadata, tensors) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
