"""Parity with llama.cpp (through llama-cpp-python, an optional extra): tokenization, dequantization by
ggml's own codecs, logits and greedy decoding of GGUF files written by us or quantized by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

import qwen3moe_jax as qj
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.chat_template import CHATML_TEMPLATE, render_chat
from qwen3moe_jax.io.gguf_file import READABLE_TYPES, GGUFTensors
from qwen3moe_jax.io.tokenizer import Tokenizer
from tests.conftest import MIXED_TEXT, finish_gguf

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)

PROMPTS = ["def fibonacci(n):\n    ", "混合专家模型", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
           "It's a small model"]
NEW_TOKENS = 32
# Files llama.cpp quantizes from our F32 export; together they hold Q4_0, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K.
LLAMA_QUANTIZED = ["Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, bpe_tokenizer):
    """One random-weight model (rows of 256, so K-quants apply everywhere) with a real BPE vocabulary, as
    GGUF files: F32/F16/BF16/Q8_0 from our writer, the rest from llama.cpp's quantizer."""
    config = qj.ModelConfig(
        vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=0, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=512,
        bos_token_id=0, eos_token_ids=(2,),
    )
    model = qj.random_model(config, seed=0, std=0.05)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, CHATML_TEMPLATE)
    directory = tmp_path_factory.mktemp("llamacpp")
    files = {}
    for qtype in ("F32", "F16", "BF16", "Q8_0"):
        files[qtype] = directory / f"{qtype}.gguf"
        qj.save_gguf(model, files[qtype], qtype)
    for ftype in LLAMA_QUANTIZED:
        files[ftype] = directory / f"{ftype}.gguf"
        llamacpp.quantize_file(files["F32"], files[ftype], ftype)
    return files


def test_tokenization_matches_llamacpp(gguf_files):
    ours = qj.load(gguf_files["F32"], progress=False).tokenizer
    with llamacpp.LlamaCpp(gguf_files["F32"], vocab_only=True) as reference:
        for text in [MIXED_TEXT, *PROMPTS, " leading space", "\n\n\ttabs\r\n", "ℝ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
            assert ours.encode(text) == reference.tokenize(text), text


@pytest.mark.parametrize("qtype", sorted(READABLE_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_dequantization_matches_ggml(tmp_path, qtype):
    """Blocks made by ggml's quantizer, read back through a GGUF file by our loader, equal ggml's to_float."""
    values = np.random.default_rng(qtype.value).standard_normal((6, 512)).astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        blocks = values
    elif qtype == GGMLQuantizationType.F16:
        blocks = values.astype(np.float16)
    else:
        blocks = llamacpp.ggml_quantize(values, qtype)
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    writer.add_tensor("t", blocks, raw_dtype=None if blocks.dtype != np.uint8 else qtype)
    finish_gguf(writer)
    ours = GGUFTensors(tmp_path / "t.gguf").get("t")
    expected = llamacpp.ggml_dequantize(blocks, qtype, values.shape)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_greedy_tokens_and_logits_equal_llamacpp(gguf_files, qtype):
    """F32 runs in f32 in both; for F16 weights llama.cpp rounds activations to f16 in its dot products,
    which moves logits by ~2e-3, below every top-2 gap on these prompts."""
    ours = qj.load(gguf_files[qtype], progress=False)
    tolerance = {"F32": 1e-4, "F16": 1e-2}[qtype]
    with llamacpp.LlamaCpp(gguf_files[qtype]) as reference:
        for prompt in PROMPTS:
            ids = ours.tokenizer.encode(prompt)
            np.testing.assert_allclose(ours.logits(ids)[-1], reference.logits(ids)[-1], atol=tolerance, rtol=0)
            assert ours.generate(ids, NEW_TOKENS, stop_token_ids=[]) == reference.greedy(ids, NEW_TOKENS), prompt


@pytest.mark.parametrize("name", ["BF16", "Q8_0", *LLAMA_QUANTIZED])
def test_quantized_files_give_llamacpps_logits(gguf_files, name):
    """llama.cpp's CPU kernels quantize activations (to bf16, or 8-bit blocks) when weights are quantized, so
    logits are compared along llama.cpp's own greedy path: ours must sit closer to llama.cpp on the same
    file than the unquantized model does (the weights we dequantized are the ones it used), and our argmax
    must take llama.cpp's token at most steps (misses are top-2 near-ties of a random model).

    Per-step errors are summarised by their median: where rounding flips a router's choice of expert, a
    step's logits move by far more than rounding, whichever side rounded (over three random models the
    median ratio to the unquantized gap was 0.62-0.77 for BF16, 0.46-0.53 Q8_0, 0.33-0.49 Q6_K, 0.10-0.22
    Q4_K_M)."""
    path = gguf_files[name]
    ours = qj.load(path, progress=False)
    unquantized = qj.load(gguf_files["F32"], progress=False)
    tensor_types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert tensor_types - {"F32"}, "the file must hold quantized tensors"
    ours_err, unquantized_err, agree = [], [], []
    with llamacpp.LlamaCpp(path) as reference:
        for prompt in PROMPTS:
            ids = ours.tokenizer.encode(prompt)
            path_ids = ids + reference.greedy(ids, NEW_TOKENS)
            theirs = reference.logits(path_ids)[len(ids) - 1: -1]
            mine = ours.logits(path_ids)[len(ids) - 1: -1]
            ours_err.extend(np.abs(mine - theirs).mean(-1))
            unquantized_err.extend(np.abs(unquantized.logits(path_ids)[len(ids) - 1: -1] - theirs).mean(-1))
            agree.extend(mine.argmax(-1) == np.array(path_ids[len(ids):]))
    ours_err, unquantized_err = np.median(ours_err), np.median(unquantized_err)
    print(f"{name}: median step error {ours_err:.4f} (unquantized {unquantized_err:.4f}), "
          f"argmax agreement {np.mean(agree):.0%}")
    assert ours_err < 0.05, (tensor_types, ours_err)
    assert ours_err < unquantized_err, (tensor_types, ours_err, unquantized_err)
    assert np.mean(agree) >= 0.8, (tensor_types, np.mean(agree))


def test_chatml_fallback_formats_as_llamacpp_does():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "混合专家?"}]
    for add_generation_prompt in (True, False):
        assert render_chat(None, messages, add_generation_prompt) == llamacpp.chat_apply_template(
            CHATML_TEMPLATE, messages, add_generation_prompt)


def test_llamacpp_reads_our_metadata(gguf_files):
    with llamacpp.LlamaCpp(gguf_files["Q8_0"], vocab_only=True) as reference:
        metadata = reference.metadata()
    ours = qj.load(gguf_files["Q8_0"], progress=False)
    assert metadata["tokenizer.ggml.pre"] == "qwen2"
    assert int(metadata["tokenizer.ggml.eos_token_id"]) == ours.config.eos_token_ids[0] == 2
    assert metadata["tokenizer.chat_template"] == ours.tokenizer.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K_M"])
def test_llamacpp_4_bit_files_loaded_as_int4_keep_their_numbers(gguf_files, name):
    """llama.cpp's own Q4_0 and Q4_K_M files loaded as int4: each Q4_0 / Q4_K tensor reaches the device as its
    4-bit blocks (Q4_K with offsets) holding gguf's dequantization of the file, exactly for Q4_0 and to the
    float16 rounding of Q4_K's sub-block scales and minimums; the host never holds a float copy of the model
    (the file's other types are dequantized and requantized one tensor at a time: measured, Q4_0 2.6 MB and
    Q4_K_M 5.8 MB of transient allocation against a 15.2 MB float32 model whose largest tensor is 2.1 MB);
    and the logits along
    llama.cpp's greedy path are closer to llama.cpp's than those of the F32 file quantized to int4 by us.
    llama.cpp keeps some matrices above 4 bits (lm_head in Q6_K, for one), which int4 requantizes, so int4
    cannot match the file as bfloat16 does. Measured (CPU), median step error: Q4_0 int4 0.133, bfloat16
    0.012, the F32 file as int4 0.194; Q4_K_M 0.204, 0.023, 0.268."""
    import tracemalloc

    import jax

    from qwen3moe_jax.io.gguf_file import INT4_TYPES, gguf_name
    from qwen3moe_jax.model.params import named_leaves
    from qwen3moe_jax.model.quant import QuantizedWeight, dequantize

    path = gguf_files[name]
    tracemalloc.start()
    int4 = qj.load(path, dtype="int4", progress=False)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bf16, f32 = (qj.load(path, dtype=dtype, progress=False) for dtype in ("bfloat16", "float32"))
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    floats = named_leaves(f32.params)
    kept = 0
    for param, leaf in named_leaves(int4.params).items():
        qtype = types[gguf_name(param)]
        if isinstance(leaf, QuantizedWeight) and qtype in INT4_TYPES:
            kept += 1
            assert (leaf.offset is not None) == (qtype == GGMLQuantizationType.Q4_K), param
            tolerance = 0 if qtype == GGMLQuantizationType.Q4_0 else 2e-3 * np.abs(floats[param]).max()
            np.testing.assert_allclose(dequantize(jax.device_get(leaf)), floats[param], rtol=0, atol=tolerance,
                                       err_msg=param)
    assert kept >= 7, "most of the 15 matrices are Q4_0 / Q4_K in both files (measured: 10 and 7)"
    model_bytes = sum(np.asarray(a).size * 4 for a in floats.values())
    largest = max(np.asarray(a).size * 4 for a in floats.values())
    print(f"{name}: {kept} tensors kept as 4-bit; float32 model {model_bytes / 1e6:.1f} MB, its largest tensor "
          f"{largest / 1e6:.1f} MB; transient host allocation while loading int4 {(peak - held) / 1e6:.2f} MB")
    # A Q6_K tensor is dequantized to float32 and requantized: a few float32 copies of that one tensor.
    assert peak - held < 4 * largest < model_bytes
    # The F32 file quantized to int4 by us alone: what keeping the file's numbers is measured against.
    requantized = qj.load(gguf_files["F32"], dtype="int4", progress=False)
    errors = {"int4": [], "bfloat16": [], "requantized": []}
    with llamacpp.LlamaCpp(path) as reference:
        for prompt in PROMPTS:
            ids = int4.tokenizer.encode(prompt)
            path_ids = ids + reference.greedy(ids, NEW_TOKENS)
            theirs = reference.logits(path_ids)[len(ids) - 1: -1]
            for label, model in (("int4", int4), ("bfloat16", bf16), ("requantized", requantized)):
                errors[label].extend(np.abs(model.logits(path_ids)[len(ids) - 1: -1] - theirs).mean(-1))
    err = {label: float(np.median(e)) for label, e in errors.items()}
    print(f"{name}: median step error against llama.cpp: " + ", ".join(f"{k} {v:.4f}" for k, v in err.items()))
    assert err["int4"] < err["requantized"]


def test_a_yarn_file_gives_llamacpps_logits_past_the_original_context(bpe_tokenizer, tmp_path):
    """Our writer's rope.scaling.* keys mean to llama.cpp what they mean to us: yarn factor 4 over 256 original
    positions, a 900-token prompt, F32 (relative error 1.4e-5 when written; the same weights read without the
    scaling are off by about 1)."""
    config = qj.ModelConfig(
        vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=0, norm_topk_prob=True, rope_theta=1e4,
        max_position_embeddings=1024, bos_token_id=0, eos_token_ids=(2,), rope_scaling=qj.Yarn(4.0, 256))
    model = qj.random_model(config, seed=0, std=0.05, max_seq_len=1024)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, CHATML_TEMPLATE)
    qj.save_gguf(model, tmp_path / "yarn.gguf", "F32")
    ids = np.random.default_rng(0).integers(3, 512, 900).tolist()
    with llamacpp.LlamaCpp(tmp_path / "yarn.gguf", n_ctx=1024) as reference:
        theirs = reference.logits(ids)
    relative = np.abs(model.logits(ids) - theirs).max() / np.abs(theirs).max()
    print(f"yarn GGUF against llama.cpp, 900 tokens: relative error {relative:.1e}")
    assert relative < 1e-4
