"""The bundled model (trained by scripts/train_small.py): it is the default everywhere, it learned Python far
beyond token frequencies on files it never saw, and llama.cpp decodes its GGUF file as we do."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.api import BUNDLED_MODEL
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.tokenizer import QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS
from qwen3moe_jax.tools.cli import main
from qwen3moe_jax.tools.training import corpus_files, evaluate, is_held_out, token_stream, unigram_loss

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\n", "class Stack:\n    def push(self, item):\n"]


@pytest.fixture(scope="module")
def model():
    return qj.load(progress=False)


def test_load_without_a_path_is_the_bundled_qwen3_moe(model):
    assert BUNDLED_MODEL.stat().st_size < 50e6
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok) == (4, 256, 16, 2)
    assert c.num_kv_heads < c.num_heads and all(c.is_moe_layer(i) for i in range(c.num_layers))
    for token in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS:
        assert model.tokenizer.encode(token) == [model.tokenizer.token_id(token)]
    assert "<|im_start|>assistant" in model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_held_out_loss_is_far_below_the_unigram_baseline(model):
    """Recomputed here from this machine's standard library: files the split never trained on."""
    files = corpus_files(Path(sysconfig.get_paths()["stdlib"]))
    train = token_stream(model.tokenizer, [text for rel, text in files if not is_held_out(rel)])
    held = token_stream(model.tokenizer, [text for rel, text in files if is_held_out(rel)])
    baseline = unigram_loss(train, held, model.config.vocab_size)
    loss, _ = evaluate(model.params, model.config, held, seq_len=256, batch_size=8, max_windows=32)
    assert loss < baseline - 1.0, (loss, baseline)


def test_greedy_output_looks_like_python(model):
    text = model.complete(PROMPTS[0], 48).text
    assert text.isascii() and "\n    " in text, text


@pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)
def test_llama_cpp_decodes_the_bundled_weights_as_we_do(model, tmp_path):
    """The same weights in F32: llama.cpp's greedy tokens equal ours. The Q8_0 file itself: llama.cpp's CPU
    kernels also quantize activations to 8 bits, which moves logits by ~1e-2, so along llama.cpp's greedy
    path our argmax must take its token except at near-ties, where the two best logits are within 0.1."""
    qj.save_gguf(model, tmp_path / "f32.gguf")
    with llamacpp.LlamaCpp(tmp_path / "f32.gguf", n_ctx=model.max_seq_len) as reference:
        for prompt in PROMPTS:
            ids = model.encode(prompt)
            assert reference.tokenize(prompt) == ids
            assert reference.greedy(ids, 48) == model.generate(ids, 48, stop_token_ids=[]), prompt
    with llamacpp.LlamaCpp(BUNDLED_MODEL, n_ctx=model.max_seq_len) as reference:
        for prompt in PROMPTS:
            ids = model.encode(prompt)
            path = np.array(reference.greedy(ids, 32))
            logits = model.logits(ids + list(path))[len(ids) - 1 : -1]
            ours = logits.argmax(-1)
            gaps = logits[np.arange(32), ours] - logits[np.arange(32), path]
            assert (ours == path).mean() >= 0.9 and gaps.max() < 0.1, (prompt, ours, path, gaps)


def test_the_cli_uses_the_bundled_model_by_default(capsys):
    assert main(["generate", "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(PROMPTS[0]) and len(out) > len(PROMPTS[0])
