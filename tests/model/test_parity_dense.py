"""PAR-1 for dense Qwen3 (`Qwen3ForCausalLM`, model_type "qwen3": the usual draft model of speculative decoding):
a random checkpoint saved by transformers, loaded by us from its directory and from a GGUF file (llama.cpp's dense
`qwen3`), gives transformers' logits and greedy tokens, and llama.cpp's from the GGUF file."""

from __future__ import annotations

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.chat_template import CHATML_TEMPLATE
from qwen3moe_jax.io.gguf_file import GGUFTensors
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.tools.parity import hf_greedy, hf_logits
from tests.hf_reference import save_hf_dense_model

# GQA 3, head_dim != hidden/heads, untied and tied embeddings; a vocabulary of 512 for the BPE tokenizer.
SHAPES = {
    "untied": dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False),
    "tied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=24, vocab_size=512, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_dense_qwen3_from_hf_and_gguf_gives_transformers_logits(name, tmp_path):
    hf = save_hf_dense_model(tmp_path / "hf", seed=len(name), **SHAPES[name])
    model = qj.load(tmp_path / "hf", max_seq_len=128, progress=False)
    assert model.config.num_experts == 0 and not any(map(model.config.is_moe_layer, range(model.config.num_layers)))
    ids = np.random.default_rng(0).integers(0, 512, size=37).tolist()
    ref = hf_logits(hf, ids)
    ours = model.logits(ids)
    print(f"PAR-1 dense {name}: relative logit error {_relative_error(ours, ref):.1e}")
    assert _relative_error(ours, ref) <= 1e-4
    prompt = [0, *ids[:6]]
    assert model.generate(prompt, max_new_tokens=24, stop_token_ids=[]) == hf_greedy(hf, prompt, 24)

    qj.save_gguf(model, tmp_path / "dense.gguf")  # llama.cpp's dense qwen3 architecture
    assert GGUFTensors(tmp_path / "dense.gguf").field("general.architecture") == "qwen3"
    from_gguf = qj.load(tmp_path / "dense.gguf", max_seq_len=128, progress=False)
    np.testing.assert_array_equal(from_gguf.logits(ids), ours)
    # And back to a Hugging Face directory that transformers reads as a Qwen3ForCausalLM.
    qj.save_hf(from_gguf, tmp_path / "again")
    np.testing.assert_array_equal(qj.load(tmp_path / "again", max_seq_len=128, progress=False).logits(ids), ours)


@pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)
def test_dense_qwen3_gguf_gives_llamacpps_logits(tmp_path, bpe_tokenizer):
    save_hf_dense_model(tmp_path / "hf", seed=5, **SHAPES["untied"])
    model = qj.load(tmp_path / "hf", max_seq_len=128, progress=False)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, CHATML_TEMPLATE)
    qj.save_gguf(model, tmp_path / "dense.gguf")
    ids = model.tokenizer.encode("def fibonacci(n):\n    return")
    with llamacpp.LlamaCpp(tmp_path / "dense.gguf") as reference:
        np.testing.assert_allclose(model.logits(ids), reference.logits(ids), atol=1e-4, rtol=0)
        assert model.generate(ids, 16, stop_token_ids=[]) == reference.greedy(ids, 16)
