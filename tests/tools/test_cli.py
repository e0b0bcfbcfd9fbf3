"""The command line: streams text, formats chat prompts, and reports bad input as one error line."""

from __future__ import annotations

import re

import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.tools.cli import main


def test_generate_streams_the_prompt_and_its_continuation(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "héllo", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    expected = qj.random_model("tiny", std=0.2).complete("héllo", 5)
    assert out == "héllo" + expected.text + "\n"  # a stop token that ended it is not printed
    summary = (rf"\[{len(expected.token_ids)} tokens \({expected.finish_reason}\), prompt 6 tokens, "
               r"time to first token \d+ ms, [\d.]+ tokens/s\]")
    assert re.search(summary, err), err


def test_chat_prints_only_the_reply(capsys, tmp_path, bpe_tokenizer):
    config = qj.preset("tiny").replace(vocab_size=512, mlp_only_layers=(), bos_token_id=0, eos_token_ids=(2,))
    model = qj.random_model(config, seed=1, std=0.2)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend)
    qj.save_gguf(model, tmp_path / "m.gguf")
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "Hi", "--chat", "--no-think",
                 "--max-new-tokens", "6"]) == 0
    out, _ = capsys.readouterr()
    assert out == model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6, enable_thinking=False) + "\n"


def test_bad_input_is_one_error_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


def test_serve_refuses_a_negative_queue_or_an_empty_batch_before_loading_anything(capsys):
    """--max-queue -1 would turn every request away with 503; --max-batch 0 would serve none."""
    for flag, value, message in (("--max-queue", "-1", "must be at least 0, got -1"),
                                 ("--max-batch", "0", "must be at least 1, got 0")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--preset", "tiny", flag, value])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
