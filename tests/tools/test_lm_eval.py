"""lm-evaluation-harness on the bundled model (the eval extra): a held-out local multiple-choice task
(tests/data/eval/pycode) gives the same accuracy, and the same log-likelihoods, through our lm-eval model class and
through lm-eval's `local-completions` model against `qwen3moe-jax serve` (echo and logprobs); those log-likelihoods
equal transformers' on the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

import qwen3moe_jax as qj  # noqa: E402
from qwen3moe_jax.tools import cli  # noqa: E402
from qwen3moe_jax.tools.lm_eval_model import Qwen3MoeLM, evaluate  # noqa: E402
from qwen3moe_jax.tools.parity import hf_logits, transformers_model  # noqa: E402
from tests.runtime.test_scoring import log_softmax  # noqa: E402
from tests.server_process import running_server  # noqa: E402

REPO = Path(__file__).parent.parent.parent
TASKS = REPO / "tests" / "data" / "eval"


def loglikelihoods(results: dict) -> list[float]:
    """Each request's log-likelihood, in document and choice order."""
    samples = sorted(results["samples"]["pycode"], key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in samples for resp in s["resps"]]


@pytest.fixture(scope="module")
def model():
    return qj.load(max_batch=8, progress=False)


def test_the_task_through_the_python_class_and_through_local_completions_against_serve(model, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository
    ours = evaluate(model, ["pycode"], TASKS, log_samples=True)
    with running_server("--max-batch", "8", "--warmup-tokens", "16", preset=None) as url:
        name = json.loads(__import__("httpx").get(f"{url}/v1/models").text)["data"][0]["id"]
        api = lm_eval.simple_evaluate(
            model="local-completions", tasks=["pycode"], bootstrap_iters=0, log_samples=True,
            task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS), include_defaults=False),
            model_args={"model": name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
                        "max_length": model.max_seq_len, "num_concurrent": 1, "max_retries": 1})
    accuracy = {how: r["results"]["pycode"]["acc,none"] for how, r in (("python", ours), ("http", api))}
    print(f"pycode accuracy: {accuracy} (acc_norm {ours['results']['pycode']['acc_norm,none']})")
    assert accuracy["python"] == accuracy["http"] > 0.25  # above chance, 4 choices
    assert ours["results"]["pycode"]["acc_norm,none"] == api["results"]["pycode"]["acc_norm,none"]
    np.testing.assert_allclose(loglikelihoods(ours), loglikelihoods(api), rtol=1e-6)

    # The same log-likelihoods from transformers on the same weights (float32), each pair tokenized as lm-eval did.
    lm = Qwen3MoeLM(model)
    reference = transformers_model(model)
    docs = [json.loads(line) for line in (TASKS / "pycode.jsonl").read_text().splitlines()]
    expected = []
    for doc in docs:
        for choice in doc["choices"]:
            context, continuation = lm._encode_pair(doc["context"], choice)
            ids = context + continuation
            logp = log_softmax(hf_logits(reference, ids))
            expected.append(math.fsum(logp[p - 1, ids[p]] for p in range(len(context), len(ids))))
    errors = np.abs(np.array(loglikelihoods(ours)) - expected) / np.abs(expected)
    print(f"pycode log-likelihoods vs transformers: max relative error {errors.max():.2e}")
    assert errors.max() <= 1e-5


def test_rolling_loglikelihood_and_generation_and_the_command(model, monkeypatch, tmp_path, capsys):
    lm = Qwen3MoeLM(model)
    text = "import os\n\n\ndef main():\n    print(os.getcwd())\n"
    request = type("Request", (), {"args": (text,)})
    ids = model.encode(text)
    # One window: the text given the end-of-text token, as lm-eval's rolling windows condition the first one.
    logp = log_softmax(model.logits([lm.prefix_token_id, *ids]))
    assert lm.loglikelihood_rolling([request]) == pytest.approx([sum(logp[p, t] for p, t in enumerate(ids))],
                                                                 rel=1e-5)
    generate = type("Request", (), {"args": ("def add(a, b):\n", {"until": ["\n\n"], "max_gen_toks": 16})})
    assert lm.generate_until([generate]) == [model.complete("def add(a, b):\n", 16, stop=["\n\n"]).text]

    monkeypatch.chdir(REPO)
    out = tmp_path / "results.json"
    assert cli.main(["eval", "--tasks", "pycode", "--include-path", str(TASKS), "--limit", "4", "--json",
                     str(out)]) == 0
    assert "acc" in capsys.readouterr().out and "pycode" in json.loads(out.read_text())["results"]
