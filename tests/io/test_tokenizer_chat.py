"""Tokenizer (GGUF vocabulary, streaming decode) and chat templates, the latter against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from transformers import PreTrainedTokenizerFast

import qwen3moe_jax as qj
from qwen3moe_jax.errors import ChatTemplateError, CheckpointError, ConfigError
from qwen3moe_jax.io.chat_template import render_chat
from qwen3moe_jax.io.gguf_file import GGUFTensors, read_gguf_tokenizer
from qwen3moe_jax.io.hf import read_hf_tokenizer
from qwen3moe_jax.io.tokenizer import GGUFVocab, Tokenizer
from tests.conftest import MIXED_TEXT, finish_gguf

TEMPLATE = (Path(qj.__file__).parent / "bundled" / "chat_template.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city (°C)",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "18"}, {"role": "tool", "content": "sunny"}],
]


def test_gguf_vocabulary_round_trip_keeps_tokenization(bpe_tokenizer):
    vocab = bpe_tokenizer.to_gguf_vocab(520)
    assert vocab.tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    back = Tokenizer.from_gguf_vocab(vocab)
    ids = back.encode(MIXED_TEXT)
    assert ids == bpe_tokenizer.encode(MIXED_TEXT)
    assert back.decode(ids) == MIXED_TEXT
    assert len(ids) < len(MIXED_TEXT.encode())  # the merges are used, not just bytes
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert back.encode(special) == [vocab.tokens.index(special)]


def test_vocabulary_larger_than_the_model_is_refused(bpe_tokenizer):
    with pytest.raises(ConfigError, match="beyond the model's vocab_size"):
        bpe_tokenizer.to_gguf_vocab(300)


@pytest.mark.parametrize("which", ["bpe", "bytes"])
def test_stream_decoding_never_splits_a_character(bpe_tokenizer, which):
    tokenizer = bpe_tokenizer if which == "bpe" else Tokenizer.byte_level()
    ids = tokenizer.encode(MIXED_TEXT)
    deltas = list(tokenizer.decode_stream(ids))
    assert "".join(deltas) == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas)
    if which == "bytes":  # every emoji is 4 one-byte tokens, yet it arrives in one delta
        assert "😀" in deltas


def test_stream_decoding_flushes_bytes_that_never_form_a_character():
    tokenizer = Tokenizer.byte_level()
    ids = tokenizer.encode("ok ") + [0xF0, 0x9F] + tokenizer.encode("!") + [0xE6]
    assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids)


def _transformers_render(messages, **kwargs):
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.byte_level().backend, chat_template=TEMPLATE)
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", [{"add_generation_prompt": True}, {"add_generation_prompt": False},
                                    {"add_generation_prompt": True, "enable_thinking": False},
                                    {"add_generation_prompt": True, "tools": TOOLS}])
def test_chat_template_renders_as_transformers_does(conversation, kwargs):
    messages = CONVERSATIONS[conversation]
    assert render_chat(TEMPLATE, messages, **kwargs) == _transformers_render(messages, **kwargs)


def test_thinking_switch_and_chatml_fallback():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, messages) == expected
    assert render_chat(None, messages, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"
    assert render_chat(None, messages, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "no role"}], "string 'role'"),
    ([{"role": "user", "content": 5}], "content of type int"),
    ([{"role": "robot", "content": "beep"}], "unknown role: robot"),
])
def test_bad_messages_give_chat_template_errors(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(TEMPLATE, messages)


def test_broken_template_gives_chat_template_error():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])


def test_hf_directory_tokenizer_and_template_as_transformers_saves_them(tmp_path, bpe_tokenizer):
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend, chat_template=TEMPLATE,
                                 bos_token="<|endoftext|>", eos_token="<|im_end|>")
    hf.save_pretrained(tmp_path)
    ours = read_hf_tokenizer(tmp_path)
    assert ours.encode(MIXED_TEXT) == hf.encode(MIXED_TEXT, add_special_tokens=False)
    assert (ours.bos_token, ours.eos_token) == ("<|endoftext|>", "<|im_end|>")
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages, enable_thinking=False) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def test_template_in_tokenizer_config_json(tmp_path, bpe_tokenizer):
    bpe_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}],
         "eos_token": {"content": "<|im_end|>"}}))
    ours = read_hf_tokenizer(tmp_path)
    assert (ours.chat_template, ours.eos_token, ours.bos_token) == (TEMPLATE, "<|im_end|>", None)


def _bpe_model(bpe_tokenizer, seed=0):
    config = qj.preset("tiny").replace(vocab_size=520, mlp_only_layers=(), bos_token_id=0, eos_token_ids=(2,))
    model = qj.random_model(config, seed=seed, std=0.1)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, TEMPLATE, "<|endoftext|>", "<|im_end|>")
    return model


def test_gguf_carries_tokenizer_and_chat_template(tmp_path, bpe_tokenizer):
    model = _bpe_model(bpe_tokenizer)
    qj.save_gguf(model, tmp_path / "m.gguf")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    back = qj.load(tmp_path / "m.gguf", progress=False)
    assert back.tokenizer.encode(MIXED_TEXT) == model.tokenizer.encode(MIXED_TEXT)
    assert back.tokenizer.chat_template == TEMPLATE
    assert (back.tokenizer.bos_token, back.tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert (back.config.bos_token_id, back.config.eos_token_ids) == (0, (2,))
    np.testing.assert_allclose(back.logits(MIXED_TEXT), model.logits(MIXED_TEXT), atol=1e-5)


def test_byte_tokenizer_without_merges_cannot_go_into_gguf(tmp_path):
    model = qj.random_model(qj.preset("tiny").replace(mlp_only_layers=()))
    with pytest.raises(ConfigError, match="no BPE merges"):
        qj.save_gguf(model, tmp_path / "m.gguf")
    qj.save_gguf(model, tmp_path / "m.gguf", with_tokenizer=False)
    assert qj.load(tmp_path / "m.gguf", progress=False).tokenizer is None


def test_chat_replies_until_im_end(bpe_tokenizer):
    model = _bpe_model(bpe_tokenizer, seed=4)
    messages = [{"role": "user", "content": "Say something."}]
    prompt = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages, enable_thinking=False))
    assert prompt[-4:] == model.tokenizer.encode("</think>\n\n")[-4:]
    full = model.generate(prompt, max_new_tokens=12, stop_token_ids=[2])
    reply = model.chat(messages, max_new_tokens=12, enable_thinking=False)
    assert reply == model.tokenizer.decode(full[:-1] if full[-1] == 2 else full)
    assert "<|im_end|>" not in reply


@pytest.mark.parametrize("model, pre", [("llama", "default"), ("gpt2", "llama-bpe")])
def test_gguf_tokenizer_of_another_kind_is_refused(tmp_path, model, pre):
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b"])
    writer.add_token_types([1, 1])
    finish_gguf(writer)
    with pytest.raises(CheckpointError, match=f"tokenizer model '{model}' with pre-tokenizer '{pre}'"):
        read_gguf_tokenizer(GGUFTensors(tmp_path / "t.gguf"))


def test_gguf_vocabulary_with_mismatched_types_is_refused(bpe_tokenizer):
    vocab = bpe_tokenizer.to_gguf_vocab(512)
    with pytest.raises(CheckpointError, match="512 tokens but 511 types"):
        Tokenizer.from_gguf_vocab(GGUFVocab(vocab.tokens, vocab.token_types[:-1], vocab.merges))
