"""`qwen3moe-jax perplexity` equals llama.cpp's llama-perplexity on the same F32 GGUF file: llama.cpp's logits over
llama.cpp's windows (written here from its tools/perplexity: consecutive windows of n_ctx tokens with the second half
scored, or with --ppl-stride windows every stride tokens scoring their last stride), against ours, within 0.5%."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.tools import cli
from tests.runtime.test_scoring import log_softmax

CONTEXT = 64


def llamacpp_perplexity(reference: llamacpp.LlamaCpp, tokens: list[int], n_ctx: int, stride: int | None) -> float:
    """llama-perplexity's figure from llama.cpp's logits (its vocabulary adds no BOS, so no token is replaced)."""
    nll = []
    if stride is None:
        first = n_ctx // 2
        for i in range(len(tokens) // n_ctx):
            window = tokens[i * n_ctx: (i + 1) * n_ctx]
            logp = log_softmax(reference.logits(window))
            nll += [-logp[j, window[j + 1]] for j in range(first, n_ctx - 1)]
    else:
        for i in range(-(-(len(tokens) - n_ctx) // stride)):
            window = tokens[i * stride: i * stride + n_ctx]
            logp = log_softmax(reference.logits(window))
            nll += [-logp[j, window[j + 1]] for j in range(n_ctx - stride - 1, n_ctx - 1)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.MISSING_REASON)
def test_perplexity_equals_llamacpps_on_the_same_gguf(tmp_path, capsys):
    path = tmp_path / "bundled-F32.gguf"
    qj.save_gguf(qj.load(progress=False), path, "F32")
    text = (Path(qj.__file__).parent / "api.py").read_text()[:2400]  # Python, the bundled model's domain
    model = qj.load(path, max_seq_len=CONTEXT, progress=False)
    tokens = model.encode(text)
    with llamacpp.LlamaCpp(path, n_ctx=CONTEXT) as reference:
        assert reference.metadata().get("tokenizer.ggml.add_bos_token") == "false"  # so no BOS, as ours
        assert reference.tokenize(text) == tokens
        figures = {}
        for stride in (None, 16):
            theirs = llamacpp_perplexity(reference, tokens, CONTEXT, stride)
            ours = model.perplexity(text, CONTEXT, stride)
            figures[stride] = (ours.perplexity, theirs)
            assert ours.windows == (len(tokens) // CONTEXT if stride is None else -(-(len(tokens) - CONTEXT) // 16))
            assert abs(ours.perplexity - theirs) / theirs < 0.005
    with capsys.disabled():
        print(f"perplexity over {len(tokens)} tokens, (ours, llama.cpp) by stride: {figures}")

    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "ppl.json"
    assert cli.main(["perplexity", str(tmp_path / "text.txt"), "--model", str(path), "--context", str(CONTEXT),
                     "--json", str(out)]) == 0
    assert f"perplexity: {figures[None][0]:.4f}" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["perplexity"] == pytest.approx(figures[None][0]) and written["windows"] == len(tokens) // CONTEXT
    assert np.isfinite(written["stderr"])
