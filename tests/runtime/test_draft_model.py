"""Speculative decoding with a draft model (runtime/draft_model.py): the target's tokens are exactly those of plain
decoding, greedy and seeded, under continuous batching; the draft's own KV cache keeps in step (the bundled model
drafting for itself has every draft kept); a draft of another vocabulary is refused."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

import qwen3moe_jax as qj
from qwen3moe_jax.api import BUNDLED_MODEL
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.runtime.draft_model import ModelDrafter
from qwen3moe_jax.runtime.speculative import SpeculativeConfig
from qwen3moe_jax.tools.cli import build_model, build_parser
from tests.runtime.test_speculative import REPEATING, programs_run

PROMPTS = [REPEATING, "def fibonacci(n):\n", "The file is read once."]
# One decode step per call (a verify step pays whenever a row drafts), chunks of 16 (a new request's draft cache
# fills in several chunks); the same settings in every test, so the compiled programs are shared.
SPECULATIVE = dict(max_batch=3, decode_steps=1, prefill_chunk=16, draft_tokens=3)


@pytest.fixture(scope="module")
def plain():
    return qj.load(progress=False, max_batch=3)


def _dense_draft(target: qj.Model, **changes) -> qj.Model:
    """A small random dense Qwen3 of the target's vocabulary and tokenizer."""
    config = qj.ModelConfig(vocab_size=target.config.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, num_experts=0, num_experts_per_tok=1, moe_intermediate_size=0,
                            intermediate_size=128, tie_word_embeddings=True).replace(**changes)
    draft = qj.random_model(config, seed=1, std=0.1)
    return qj.Model(draft.config, draft.params, target.tokenizer)


def test_the_target_drafting_for_itself_keeps_every_draft_and_its_tokens(plain):
    """Greedy: every drafted token is kept (the draft's cache holds exactly what the target's does, through
    prefill chunks, partial and full acceptance and a batch of rows); the tokens are plain decoding's."""
    spec = qj.load(progress=False, **SPECULATIVE, draft_model=plain)
    sampling = qj.SamplingParams(max_new_tokens=32)
    assert [c.token_ids for c in spec.complete_batch(PROMPTS, sampling)] == \
        [c.token_ids for c in plain.complete_batch(PROMPTS, sampling)]
    speculator = spec.scheduler.speculator
    assert speculator.drafted_tokens > 50
    assert speculator.accepted_tokens >= 0.97 * speculator.drafted_tokens  # float rounding may flip a near-tie


def test_a_small_dense_draft_keeps_greedy_and_seeded_tokens(plain, tmp_path):
    """A random dense Qwen3, read from a GGUF file (llama.cpp's `qwen3`), drafts for the bundled model: its drafts
    are mostly refused, and every request's tokens, greedy, seeded or penalised, are still plain decoding's."""
    qj.save_gguf(_dense_draft(plain), tmp_path / "draft.gguf")
    spec = qj.load(progress=False, **SPECULATIVE, draft_model=tmp_path / "draft.gguf")
    assert spec.draft.config.num_experts == 0
    cases = [qj.SamplingParams(max_new_tokens=30), qj.SamplingParams(max_new_tokens=24, temperature=0.8, seed=3),
             qj.SamplingParams(max_new_tokens=20, repeat_penalty=1.3, repeat_last_n=16, temperature=1.0, top_k=5,
                               seed=11)]
    got = spec.complete_batch(PROMPTS, cases)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.complete_batch(PROMPTS, cases)]
    assert spec.scheduler.speculator.drafted_tokens > 0


def test_warm_up_runs_the_draft_models_programs(plain):
    """The target's warm-up runs the draft model's programs too (its prompt chunks and its draft steps of each feed
    width), so that a server compiles them before it serves: every one a request runs was run at warm-up."""
    spec = qj.load(progress=False, **SPECULATIVE, draft_model=plain)
    draft_engine = spec.scheduler.speculator.drafter.engine
    assert spec.engine.draft_engine is draft_engine
    with programs_run(draft_engine) as warmup:
        steps = spec.engine.warmup_steps(64, 32, all_buckets=True)
        for _, compile_step in steps:
            compile_step()
    assert any(what.startswith("draft model: draft 3 after 8 fed") for what, _ in steps)
    with programs_run(draft_engine) as requests:
        spec.complete_batch(PROMPTS, qj.SamplingParams(max_new_tokens=24))
    assert {name for name, _ in requests} == {"draft_block", "prefill_chunk"}
    assert requests <= warmup


def test_serve_and_generate_take_a_draft_model_path():
    args = build_parser().parse_args(["serve", "--draft-model", str(BUNDLED_MODEL), "--draft-tokens", "2"])
    model = build_model(args)
    assert model.speculative == SpeculativeConfig("draft_model", draft_tokens=2)
    assert isinstance(model.scheduler.speculator.drafter, ModelDrafter)
    assert model.draft.config == model.config


def test_a_draft_model_of_another_vocabulary_or_method_is_a_config_error(plain):
    with pytest.raises(ConfigError, match="share the target's tokenizer"):
        qj.load(progress=False, draft_model=_dense_draft(plain, vocab_size=plain.config.vocab_size + 8))
    tokenizer = json.loads(plain.tokenizer.backend.to_str())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens' ids swapped: the same size, not the same tokenizer
    other = _dense_draft(plain)
    other.tokenizer = Tokenizer(HFTokenizer.from_str(json.dumps(tokenizer)))
    with pytest.raises(ConfigError, match="tokenizer differs from the target's at 2 token ids"):
        qj.load(progress=False, draft_model=other)
    with pytest.raises(ConfigError, match="choose one"):
        qj.load(progress=False, speculative="ngram", draft_model=plain)
    with pytest.raises(ConfigError, match="needs a draft_model"):
        qj.load(progress=False, speculative="draft_model")
