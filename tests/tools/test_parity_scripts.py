"""Greedy baselines (qwen3moe_jax.tools.parity) and the two scripts over them: a baseline from transformers or
llama.cpp survives a save/load, our f32 model checks clean against it, and the check does report errors
where they are (bf16 weights, perturbed logits, a changed greedy token)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.chat_template import CHATML_TEMPLATE
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.tools.parity import (
    DEFAULT_PROMPTS,
    Baseline,
    check_against_baseline,
    hf_logits,
    make_baseline,
    random_prompts,
)
from tests.hf_reference import save_hf_model

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_baseline(hf_tiny, tmp_path_factory):
    """A transformers baseline of hf_tiny on three random prompts, written to disk and read back."""
    path, _ = hf_tiny
    built = make_baseline("transformers", path, random_prompts(300, 3, 20, seed=1), NEW_TOKENS)
    json_path = tmp_path_factory.mktemp("baseline") / "hf.json"
    built.save(json_path)
    return built, Baseline.load(json_path)


@pytest.fixture(scope="module")
def ours_f32(hf_tiny):
    return qj.load(hf_tiny[0], dtype="float32", progress=False)


def test_baseline_survives_save_and_load(hf_baseline):
    built, loaded = hf_baseline
    assert (loaded.source, loaded.model, loaded.new_tokens) == (built.source, built.model, NEW_TOKENS)
    assert len(loaded.prompts) == 3
    for a, b in zip(built.prompts, loaded.prompts, strict=True):
        assert (b.text, b.ids, b.greedy) == (None, a.ids, a.greedy)
        assert len(b.greedy) == NEW_TOKENS
        assert b.path_logits.dtype == np.float32 and b.path_logits.shape == (NEW_TOKENS, 300)
        np.testing.assert_array_equal(b.path_logits, a.path_logits)


def test_baseline_rows_are_transformers_own(hf_tiny, hf_baseline):
    """Each greedy token is the argmax of the row said to choose it, and the first row is the reference's
    next-token logits after the prompt alone (the rows are not shifted by one)."""
    _, hf = hf_tiny
    _, baseline = hf_baseline
    for p in baseline.prompts:
        assert p.path_logits.argmax(-1).tolist() == p.greedy
        np.testing.assert_allclose(p.path_logits[0], hf_logits(hf, p.ids)[-1], atol=1e-5)


def test_f32_model_checks_clean(ours_f32, hf_baseline):
    rows = check_against_baseline(ours_f32, hf_baseline[1])
    assert len(rows) == 3
    for row in rows:
        assert row["prompt_tokens"] == 20 and row["same_ids"] is None
        assert row["greedy_first_divergence"] is None
        assert row["max_abs_logit_error"] < 1e-4
        assert row["mean_abs_logit_error"] < row["max_abs_logit_error"]
        assert row["argmax_agreement"] == 1.0


def test_bf16_model_shows_a_larger_bounded_error(hf_tiny, hf_baseline):
    """bf16 weights and activations keep ~3 significant digits: the error must rise far above f32's ~1e-6,
    yet stay small against the logits' own scale (a broken model is off by that much) and keep most argmaxes."""
    _, baseline = hf_baseline
    scale = max(float(np.abs(p.path_logits).max()) for p in baseline.prompts)
    rows = check_against_baseline(qj.load(hf_tiny[0], dtype="bfloat16", progress=False), baseline)
    worst = max(row["max_abs_logit_error"] for row in rows)
    mean = np.mean([row["mean_abs_logit_error"] for row in rows])
    print(f"bf16 vs transformers f32: max {worst:.2e}, mean {mean:.2e}, logit scale {scale:.1f}")
    assert 1e-3 < worst < 0.5 * scale
    assert 1e-4 < mean < 0.02 * scale
    assert np.mean([row["argmax_agreement"] for row in rows]) >= 0.75


def test_perturbations_are_reported_where_they_are(ours_f32, hf_baseline):
    _, baseline = hf_baseline
    clean = check_against_baseline(ours_f32, baseline)
    broken = copy.deepcopy(baseline)
    # A logit moved by 0.5 in prompt 1: its max error becomes 0.5, its mean rises by 0.5 / (N * vocab).
    broken.prompts[1].path_logits[5, 17] += 0.5
    # A different last greedy token in prompt 2: the path logits do not depend on it (it is never fed in),
    # so only the divergence and the argmax agreement may change.
    last = broken.prompts[2].greedy[-1]
    broken.prompts[2].greedy[-1] = (last + 1) % 300
    rows = check_against_baseline(ours_f32, broken)

    assert rows[0] == clean[0]
    assert rows[1]["max_abs_logit_error"] == pytest.approx(0.5, abs=1e-4)
    assert rows[1]["mean_abs_logit_error"] - clean[1]["mean_abs_logit_error"] == pytest.approx(
        0.5 / (NEW_TOKENS * 300), rel=1e-2)
    assert rows[1]["greedy_first_divergence"] is None
    assert rows[2]["greedy_first_divergence"] == NEW_TOKENS - 1
    assert rows[2]["argmax_agreement"] == pytest.approx((NEW_TOKENS - 1) / NEW_TOKENS)
    assert rows[2]["max_abs_logit_error"] == clean[2]["max_abs_logit_error"]


def test_our_baseline_agrees_with_transformers(hf_tiny, hf_baseline):
    """The "ours" source, built independently of check_against_baseline, lands on transformers' tokens."""
    _, reference = hf_baseline
    ours = make_baseline("ours", hf_tiny[0], [p.ids for p in reference.prompts], NEW_TOKENS)
    assert ours.source == "ours"
    for a, b in zip(ours.prompts, reference.prompts, strict=True):
        assert a.greedy == b.greedy
        np.testing.assert_allclose(a.path_logits, b.path_logits, atol=1e-4)


def test_malformed_baselines_are_refused(hf_baseline, tmp_path):
    _, baseline = hf_baseline
    good = tmp_path / "good.json"
    baseline.save(good)

    (tmp_path / "lost.json").write_text(good.read_text())  # no lost.npz beside it
    with pytest.raises(qj.CheckpointError, match="lost.npz"):
        Baseline.load(tmp_path / "lost.json")

    (tmp_path / "other.json").write_text(json.dumps({"source": "ours"}))
    with pytest.raises(qj.CheckpointError, match="not a greedy baseline"):
        Baseline.load(tmp_path / "other.json")

    short = copy.deepcopy(baseline)
    for p in short.prompts:
        p.path_logits = p.path_logits[:-1]
    short.save(tmp_path / "short.json")
    (tmp_path / "short.json").write_text(good.read_text())  # the JSON promises NEW_TOKENS rows per prompt
    with pytest.raises(qj.CheckpointError, match="malformed"):
        Baseline.load(tmp_path / "short.json")

    with pytest.raises(qj.ConfigError):
        make_baseline("vllm", good, [[1, 2]], 4)


def test_scripts_write_then_check_a_baseline(hf_tiny, tmp_path):
    path = str(hf_tiny[0])
    out = tmp_path / "b.json"
    made = run_script("greedy_baseline.py", "--model", path, "--source", "transformers", "--random-prompts", "2",
                      "--prompt-len", "10", "--new-tokens", "8", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert out.is_file() and out.with_suffix(".npz").is_file()
    assert str(out) in made.stdout and str(out.with_suffix(".npz")) in made.stdout

    checked = run_script("parity_check.py", "--model", path, "--against", str(out))
    assert checked.returncode == 0, checked.stderr
    table = checked.stdout.splitlines()
    assert "greedy diverges at" in table[1]
    assert len(table) == 4 and all(" never " in line for line in table[2:]), checked.stdout


def test_scripts_help_and_one_line_errors(hf_tiny):
    for name in ("greedy_baseline.py", "parity_check.py"):
        shown = run_script(name, "--help")
        assert shown.returncode == 0 and "baseline" in shown.stdout and "--model" in shown.stdout
    wrong = run_script("parity_check.py", "--model", str(hf_tiny[0]), "--against", "llama.cpp")
    assert wrong.returncode != 0
    assert wrong.stderr.strip().count("\n") == 0, wrong.stderr
    assert "GGUF" in wrong.stderr or llamacpp.MISSING_REASON in wrong.stderr


@pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)
def test_f32_gguf_checks_clean_against_llamacpp(tmp_path, bpe_tokenizer):
    """Text prompts tokenized by llama.cpp itself, on an F32 file we wrote: same ids, same greedy, f32 logits.
    The weights come from transformers' initializer (random_model's op-by-op init is slower to run)."""
    save_hf_model(
        tmp_path, seed=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        vocab_size=512, max_position_embeddings=512,
    )
    model = qj.load(tmp_path, progress=False)
    model.tokenizer = Tokenizer(bpe_tokenizer.backend, CHATML_TEMPLATE)
    gguf = tmp_path / "f32.gguf"
    qj.save_gguf(model, gguf, "F32")

    # Short prompts, code, CJK and English, so one prefill and one logits shape cover them all.
    prompts = [DEFAULT_PROMPTS[0], "混合专家模型", DEFAULT_PROMPTS[-1]]
    baseline = make_baseline("llama.cpp", gguf, prompts, NEW_TOKENS)
    assert baseline.source == "llama.cpp" and [p.text for p in baseline.prompts] == prompts
    rows = check_against_baseline(qj.load(gguf, progress=False), baseline)
    for row in rows:
        assert row["same_ids"] is True, row
        assert row["greedy_first_divergence"] is None, row
        assert row["max_abs_logit_error"] < 1e-4, row
        assert row["argmax_agreement"] == 1.0, row
