"""GGUF files: our writer and reader against transformers, quantized types against the gguf package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from transformers import Qwen3MoeForCausalLM

import qwen3moe_jax as qj
from qwen3moe_jax.io.gguf_file import READABLE_TYPES, GGUFTensors
from qwen3moe_jax.io.gguf_write import write_gguf
from qwen3moe_jax.model.params import named_leaves
from qwen3moe_jax.tools.parity import hf_logits
from tests.conftest import finish_gguf
from tests.hf_reference import save_hf_model

IDS = [0, 5, 9, 100, 3, 7, 8, 22, 1, 64, 127, 31]



@pytest.fixture(scope="module")
def hf_gguf_ready(tmp_path_factory):
    """A checkpoint llama.cpp's qwen3moe can express (all layers MoE, norm_topk_prob) with rows of 32k."""
    path = tmp_path_factory.mktemp("hf_gguf")
    hf = save_hf_model(path, seed=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       norm_topk_prob=True, vocab_size=128, rms_norm_eps=1e-5)
    return path, hf


def test_f32_round_trip_gives_the_hf_logits(hf_gguf_ready, tmp_path):
    path, hf = hf_gguf_ready
    model = qj.load(path, progress=False)
    qj.save_gguf(model, tmp_path / "m.gguf", "F32")
    back = qj.load(tmp_path / "m.gguf", progress=False)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "rope_theta", "tie_word_embeddings"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    assert back.config.rms_norm_eps == pytest.approx(1e-5)
    np.testing.assert_allclose(back.logits(IDS), hf_logits(hf, IDS), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_quantized_file_equals_transformers_on_the_dequantized_weights(hf_gguf_ready, tmp_path, qtype):
    """The reference: transformers run on weights the gguf package itself quantized and dequantized."""
    path, hf = hf_gguf_ready
    qj.save_gguf(qj.load(path, progress=False), tmp_path / "m.gguf", qtype)
    ours = qj.load(tmp_path / "m.gguf", progress=False)

    target = GGMLQuantizationType[qtype]
    ref = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim >= 2:  # HF [out, in] rows are GGUF rows: blocks run along the input dimension
                w = p.numpy()
                p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, target), target).reshape(w.shape)))
    expected = hf_logits(ref, IDS)
    err = np.abs(ours.logits(IDS) - expected).max()
    print(f"GGUF {qtype}: max |logit error| vs transformers on the same dequantized weights = {err:.2e}")
    np.testing.assert_allclose(ours.logits(IDS), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_dequantization_matches_the_gguf_package(tmp_path, qtype):
    target = GGMLQuantizationType[qtype]
    data = np.random.default_rng(0).normal(size=(6, 256)).astype(np.float32)
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    writer.add_tensor("x", quants.quantize(data, target), raw_dtype=target)
    finish_gguf(writer)
    got = GGUFTensors(tmp_path / "t.gguf").get("x")
    np.testing.assert_array_equal(got, quants.dequantize(quants.quantize(data, target), target))
    assert got.shape == data.shape


def test_errors_name_the_problem(hf_gguf_ready, tmp_path):
    path, _ = hf_gguf_ready
    model = qj.load(path, progress=False)
    qj.save_gguf(model, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(qj.CheckpointError, match="truncated"):
        qj.load(tmp_path / "cut.gguf", progress=False)

    writer = GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("token_embd", np.zeros((4, 8), np.float32))
    finish_gguf(writer)
    with pytest.raises(qj.ConfigError, match="architecture 'llama'"):
        qj.load(tmp_path / "llama.gguf")

    with pytest.raises(qj.ConfigError, match="Q4_K"):
        qj.save_gguf(model, tmp_path / "x.gguf", "Q4_K")
    dense = qj.random_model("tiny")  # has a dense layer and cannot be expressed in qwen3moe GGUF
    with pytest.raises(qj.ConfigError, match="dense"):
        qj.save_gguf(dense, tmp_path / "x.gguf")
    unnormalised = qj.Model(model.config.replace(norm_topk_prob=False), model.params, None)
    with pytest.raises(qj.ConfigError, match="norm_topk_prob"):
        qj.save_gguf(unnormalised, tmp_path / "x.gguf")


def test_missing_tensor_and_unsupported_type_are_named(hf_gguf_ready, tmp_path):
    model = qj.load(hf_gguf_ready[0], progress=False)
    arrays = {name: np.asarray(a) for name, a in named_leaves(model.params).items()}
    del arrays["layers.1.attn.k_norm"]
    write_gguf(tmp_path / "partial.gguf", model.config, arrays)
    with pytest.raises(qj.CheckpointError, match=r"blk\.1\.attn_k_norm"):
        qj.load(tmp_path / "partial.gguf", progress=False)

    iq = GGMLQuantizationType.IQ4_NL
    writer = GGUFWriter(str(tmp_path / "iq.gguf"), "qwen3moe")
    raw = np.zeros(quants.quant_shape_to_byte_shape((4, 256), iq), np.uint8)
    writer.add_tensor("x", raw, raw_shape=raw.shape, raw_dtype=iq)
    finish_gguf(writer)
    with pytest.raises(qj.CheckpointError, match="IQ4_NL"):
        GGUFTensors(tmp_path / "iq.gguf").get("x")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf from random scale bytes
@pytest.mark.parametrize("qtype", sorted(READABLE_TYPES - {GGMLQuantizationType.F32}, key=lambda t: t.value),
                         ids=lambda t: t.name)
def test_blocks_are_kept_and_dequantized_as_the_gguf_package_does(tmp_path, qtype):
    """Arbitrary bytes as blocks (scales included, so NaN/inf appear too): the loader hands back the file's
    bytes untouched for a quantized path, and the gguf package's dequantization of them for the float path.
    (tests/io/test_parity_llamacpp.py checks the same against ggml's own codecs.)"""
    raw = np.random.default_rng(qtype.value).integers(0, 256, quants.quant_shape_to_byte_shape((3, 512), qtype),
                                                      dtype=np.uint8)
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    writer.add_tensor("t", raw, raw_shape=raw.shape, raw_dtype=qtype)
    finish_gguf(writer)
    stored = GGUFTensors(tmp_path / "t.gguf").raw("t")
    assert stored.qtype == qtype
    np.testing.assert_array_equal(stored.blocks.view(np.uint8).reshape(raw.shape), raw)
    np.testing.assert_array_equal(stored.dequantize(), quants.dequantize(raw, qtype).reshape(3, 512))
