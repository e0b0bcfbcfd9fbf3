"""The training recipe (qwen3moe_jax.tools.training) at a toy size: it learns, it is deterministic given a seed, a
resumed run equals an uninterrupted one, and its tokenizer and export are what the bundled model needs."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
from gguf import GGUFReader, TokenType

import qwen3moe_jax as qj
from qwen3moe_jax.io.tokenizer import QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS
from qwen3moe_jax.tools.training import TrainConfig, is_held_out, train

TOY_SHAPE = {"hidden_size": 64, "num_layers": 2, "num_experts": 4, "moe_intermediate_size": 32}
VOCAB = 700


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two stdlib packages' sources: enough text for a 700-token BPE and a held-out split."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        shutil.copytree(stdlib / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run(corpus, out, steps=40, **kwargs):
    tc = TrainConfig(steps=steps, batch_size=4, seq_len=64, peak_lr=1e-2, warmup_steps=4, seed=kwargs.pop("seed", 0))
    return train(corpus, out, tc, VOCAB, TOY_SHAPE, checkpoint_every=8, eval_every=8, **kwargs)


def checkpoint_leaves(out: Path) -> list[np.ndarray]:
    with np.load(out / "checkpoint.npz") as data:
        return [data[k] for k in sorted(data.files)]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, run(corpus, out, export=out / "toy.gguf", qtype="Q8_0")


def test_training_learns_and_reports_its_figures(trained):
    out, metrics = trained
    assert json.loads((out / "metrics.json").read_text())["held_out_loss"] == metrics["held_out_loss"]
    losses = [row["loss"] for row in metrics["history"]]
    # Training starts at the uniform guess, ln(vocab) = 6.55 nats; 40 toy steps reach token frequencies.
    assert losses[-1] < math.log(VOCAB) - 0.7, losses
    assert metrics["held_out_loss"] < math.log(VOCAB) - 0.5, metrics["held_out_loss"]
    assert metrics["unigram_held_out_loss"] < math.log(VOCAB)
    usage = metrics["expert_usage_held_out"]
    assert len(usage["normalised_entropy"]) == TOY_SHAPE["num_layers"]
    assert all(0 < e <= 1 for e in usage["normalised_entropy"])
    assert metrics["tokens_seen"] == 40 * 4 * 64


def test_same_seed_same_weights_and_resume_equals_an_uninterrupted_run(corpus, trained, tmp_path):
    out, metrics = trained
    again = tmp_path / "again"
    run(corpus, again)
    for a, b in zip(checkpoint_leaves(out), checkpoint_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)

    resumed = tmp_path / "resumed"
    assert run(corpus, resumed, stop_after=20) is None
    resumed_metrics = run(corpus, resumed, resume=True)
    for a, b in zip(checkpoint_leaves(out), checkpoint_leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed_metrics["history"] == metrics["history"]  # the loss curve covers the whole run

    other_seed = tmp_path / "other"
    run(corpus, other_seed, steps=8, seed=1)
    run(corpus, again, steps=8)
    pairs = zip(checkpoint_leaves(other_seed), checkpoint_leaves(again), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_exported_model_loads_with_qwen_tokens_and_chat_template(trained):
    out, metrics = trained
    model = qj.load(out / "toy.gguf", progress=False)
    assert model.config.vocab_size == VOCAB
    assert model.config.max_position_embeddings == 64
    tokenizer = model.tokenizer
    for token in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.token_id(token)], token
    assert tokenizer.token_id("<|endoftext|>") == 0 and tokenizer.token_id("</think>") == VOCAB - 1
    assert model.config.eos_token_ids == (0,)
    types = GGUFReader(out / "toy.gguf").fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert kinds[tokenizer.token_id("<|im_end|>")] == TokenType.CONTROL
    assert kinds[tokenizer.token_id("<think>")] == TokenType.USER_DEFINED
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # The float32 copy kept beside the checkpoint holds the trained weights exactly; Q8_0 is close to it.
    exact = qj.load(out / "model-F32.gguf", progress=False)
    with np.load(out / "checkpoint.npz") as data:
        for i, leaf in enumerate(jax.tree.leaves(exact.params)):
            np.testing.assert_array_equal(np.asarray(leaf), data[f"leaf{i}"])
    ids = model.encode("import json\n")
    assert np.abs(exact.logits(ids) - model.logits(ids)).max() < 0.2


def test_the_held_out_split_is_by_path_and_about_one_in_twenty():
    paths = [f"pkg{i}/module{j}.py" for i in range(20) for j in range(50)]
    share = sum(map(is_held_out, paths)) / len(paths)
    assert 0.03 < share < 0.08
    assert is_held_out(paths[7]) == is_held_out(str(paths[7]))


def test_mixed_lengths_alternate_steps_with_as_many_tokens_each():
    """--mix-seq-len: every other step's batch is windows of the other length, as many tokens in all."""
    tc = TrainConfig(batch_size=2, seq_len=2048, mix_seq_len=256)
    assert [tc.window(step) for step in range(4)] == [(2, 2048), (16, 256), (2, 2048), (16, 256)]
    assert {TrainConfig(batch_size=2, seq_len=2048).window(step) for step in range(4)} == {(2, 2048)}
