"""Constrained decoding (issue 23.1): json_schema / regex / grammar outputs checked by independent validators
(jsonschema, Python's re), the device mask checked step by step against llguidance's own mask and NumPy,
several decode steps per call giving exactly the tokens of a mask at every step (through either host call),
batch invariance, no compilation per schema, and bad constraints refused up front."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import llguidance
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.errors import SamplingError
from qwen3moe_jax.runtime.constraints import mask_words
from qwen3moe_jax.runtime.sampling import unpack_mask
from qwen3moe_jax.tools.bench import CompileLog

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "kind": {"enum": ["module", "class", "function"]}},
    "required": ["name", "age", "tags", "kind"], "additionalProperties": False}
PROMPT = "import os\n"


@pytest.fixture(scope="module")
def model() -> qj.Model:
    return qj.load(progress=False, max_batch=3)


@pytest.fixture(scope="module")
def single_step() -> qj.Model:
    return qj.load(progress=False, decode_steps=1)


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_validates_at_temperature_1(model, seed):
    done = model.complete(PROMPT, sampling=qj.SamplingParams(json_schema=SCHEMA, temperature=1.0, seed=seed,
                                                             max_new_tokens=200))
    assert done.finish_reason == "grammar_complete", done
    value = json.loads(done.text)
    jsonschema.validate(value, SCHEMA)
    assert list(value) == list(SCHEMA["properties"])  # properties come in the schema's order


def test_json_schema_given_as_text_and_regex_and_lark_grammar(model):
    text = model.complete(PROMPT, sampling=qj.SamplingParams(json_schema=json.dumps({"type": "array", "items": {
        "type": "integer", "minimum": -99, "maximum": 99}, "minItems": 2, "maxItems": 2}), temperature=1.0, seed=3,
        max_new_tokens=60))
    assert len(json.loads(text.text)) == 2 and all(isinstance(x, int) for x in json.loads(text.text))
    pattern = r"(def|class) [a-z_]{1,12}\(\)"
    for seed in range(3):
        done = model.complete(PROMPT, sampling=qj.SamplingParams(regex=pattern, temperature=1.0, seed=seed,
                                                                 max_new_tokens=60))
        assert re.fullmatch(pattern, done.text), done.text
    grammar = 'start: answer "."\nanswer: "yes" | "no" | "maybe"'
    done = model.complete(PROMPT, sampling=qj.SamplingParams(grammar=grammar, temperature=1.0, seed=1))
    assert done.text in ("yes.", "no.", "maybe.") and done.finish_reason == "grammar_complete"


def test_each_masked_token_is_the_best_token_llguidance_allows(single_step):
    """Greedy: every token is the argmax of the model's logits (computed in one pass, not by the decode
    step) over the tokens a separate llguidance matcher allows (unpacked by NumPy)."""
    m = single_step
    sampling = qj.SamplingParams(json_schema=SCHEMA, max_new_tokens=40)
    done = m.complete(PROMPT, sampling=sampling)
    prompt = m.encode(PROMPT)
    matcher = m.constraint(sampling).matcher
    words = np.empty(mask_words(m.config.vocab_size), np.int32)
    logits = m.logits(prompt + done.token_ids)[len(prompt) - 1:]
    for i, token in enumerate(done.token_ids):
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: m.config.vocab_size].astype(bool)
        assert allowed[token]
        best = np.where(allowed, logits[i], -np.inf)
        assert logits[i][token] >= best.max() - 1e-4, i  # ties within float noise of the two paths
        assert matcher.consume_token(token)
    assert allowed.sum() < m.config.vocab_size  # the mask did restrict something


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=7),
    dict(temperature=0.8, top_k=20, seed=2),
    dict(temperature=1.2, top_p=0.9, repeat_penalty=1.3, seed=5),
], ids=["greedy", "t1", "top_k", "top_p_penalty"])
def test_several_steps_per_call_give_the_tokens_of_a_mask_at_every_step(model, single_step, settings):
    """decode_steps 4 gets the masks of a block's later steps from the host while the block runs; decode_steps 1
    gets every step's with its inputs. Both give the same tokens (constraints.py)."""
    for schema in (SCHEMA, {"type": "string", "pattern": "^[a-z ]{4,30}$"}):
        sampling = qj.SamplingParams(json_schema=schema, max_new_tokens=120, **settings)
        fast, slow = model.complete(PROMPT, sampling=sampling), single_step.complete(PROMPT, sampling=sampling)
        assert fast.token_ids == slow.token_ids
        jsonschema.validate(json.loads(fast.text), schema)


def test_the_io_callback_path_gives_the_tokens_of_the_cpu_host_step(model):
    """Where cpu_kernels.host_step cannot run (GPU, TPU, a mesh), the block calls its grammar through JAX's
    io_callback: the same tokens. On the CPU, with the kernels built, it takes host_step."""
    from qwen3moe_jax.model import cpu_kernels

    assert (model.engine.grammar.host_step is not None) == cpu_kernels.available()
    other = qj.load(progress=False, max_batch=3)
    other.engine.grammar.host_step = None  # before its first constrained block compiles
    for schema in (SCHEMA, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50}}):
        sampling = qj.SamplingParams(json_schema=schema, temperature=1.0, seed=3, max_new_tokens=80)
        done = other.complete(PROMPT, sampling=sampling)
        assert done.token_ids == model.complete(PROMPT, sampling=sampling).token_ids
        jsonschema.validate(json.loads(done.text), schema)


def test_constrained_and_free_requests_batch_without_changing_each_other(model):
    samplings = [qj.SamplingParams(json_schema=SCHEMA, temperature=1.0, seed=4, max_new_tokens=120),
                 qj.SamplingParams(temperature=1.0, seed=9, max_new_tokens=40),
                 qj.SamplingParams(regex=r"[a-z]{1,8}(\.[a-z]{1,8}){1,3}", temperature=0.7, seed=1, max_new_tokens=40),
                 qj.SamplingParams(max_new_tokens=25)]
    prompts = [PROMPT, "def main(", "from collections import", PROMPT]
    alone = [model.complete(p, sampling=s).token_ids for p, s in zip(prompts, samplings, strict=True)]
    together = model.complete_batch(prompts, samplings, max_batch=3)
    assert [c.token_ids for c in together] == alone
    assert re.fullmatch(r"[a-z]{1,8}(\.[a-z]{1,8}){1,3}", together[2].text)


def test_a_new_schema_compiles_nothing(model):
    model.complete(PROMPT, sampling=qj.SamplingParams(json_schema=SCHEMA, max_new_tokens=20))
    with CompileLog() as log:
        for i in range(3):
            schema = {"type": "object", "properties": {f"field{i}": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": [f"field{i}"], "additionalProperties": False}
            done = model.complete(PROMPT, sampling=qj.SamplingParams(json_schema=schema, max_new_tokens=20))
            assert list(json.loads(done.text)) == [f"field{i}"]
    assert log.compiles() == 0


def test_unpack_mask_matches_numpy():
    rng = np.random.default_rng(0)
    vocab = 100
    words = rng.integers(-2**31, 2**31, size=(3, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    expected = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    np.testing.assert_array_equal(np.asarray(unpack_mask(jnp.asarray(words), vocab)), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "object"}, regex="a+"), "at most one"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1, 2]), "must be a JSON schema"),
    (dict(regex=5), "must be a string"),
])
def test_bad_constraints_are_refused_on_construction(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        qj.SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(json_schema={"type": "bogus"}), dict(regex="(("),
                                    dict(grammar="start: undefined_rule")])
def test_invalid_grammars_are_refused_before_generation(model, kwargs):
    with pytest.raises(qj.ConstraintError, match="invalid constraint"):
        model.request(PROMPT, qj.SamplingParams(**kwargs))


def test_a_model_without_tokenizer_refuses_constraints():
    m = qj.random_model("tiny", max_seq_len=32)
    m = qj.Model(m.config, m.params, None, max_seq_len=32)
    with pytest.raises(qj.Qwen3MoeError, match="tokenizer"):
        m.request([1, 2, 3], qj.SamplingParams(regex="a", max_new_tokens=4))


def test_llguidance_is_the_engine():  # the constraint machinery is llguidance's, not ours
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)) == ""


def test_the_cost_benchmark_pairs_each_constrained_request_with_an_unconstrained_one_of_its_length(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "bench_constraints.py"
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(script), "--decode-steps", "2", "--seeds", "2", "--rounds", "1",
                           "--max-new-tokens", "24", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["2"]
    for case in ("json_schema", "regex"):
        r = result[case]
        assert r["tokens"] > 0 and r["pairs"] >= 1 and r["vs_unconstrained"] > 0
        assert r["tokens_per_s"] > 0 and r["unconstrained_tokens_per_s"] > 0
    assert "json_schema" in done.stdout and "x  (" in done.stdout
