"""The benchmark harness on the tiny preset with small lengths: every figure is there, warm-up leaves nothing to
compile in the timed runs, the compile counter counts, and the transformers comparison runs the same weights."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

import qwen3moe_jax as qj
from qwen3moe_jax.tools import bench
from qwen3moe_jax.tools.bench import CompileLog, format_table, run_bench
from qwen3moe_jax.tools.cli import main
from qwen3moe_jax.tools.parity import transformers_model


def test_compile_log_counts_compilations_not_cache_hits():
    def double_plus_one(x):
        return 2 * x + 1

    f = jax.jit(double_plus_one)
    three, four = np.ones(3, np.float32), np.ones(4, np.float32)  # numpy inputs: making them compiles nothing
    with CompileLog() as log:
        f(three)
        first = log.compiles()
        f(three)
        again = log.compiles()
        f(four)  # a new shape compiles anew
        new_shape = log.compiles()
    f(np.ones(5, np.float32))  # after exit: not recorded
    assert (first, again, new_shape, log.compiles()) == (1, 1, 2, 2)
    assert log.compiles(since=len(log.events)) == 0
    assert log.seconds("double_plus_one") > 0 and log.seconds("something_else") == 0


def test_bench_cli_prints_the_table_and_writes_every_figure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    # One layer of the tiny preset: a third of its compile time.
    assert main(["bench", "--preset", "tiny", "--layers", "1", "--max-seq-len", "64", "--prompt-lengths", "8,16,100",
                 "--decode-tokens", "8", "--batch-sizes", "2", "--repeats", "2", "--compare", "hf",
                 "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(path.read_text())

    assert result["model"] == "tiny (1 of 3 layers)" and result["dtype"] == "float32" and result["max_seq_len"] == 64
    assert result["jax_version"] == jax.__version__ and result["platform"] == jax.default_backend()
    assert result["params"] > result["active_params"] > 0 and result["device"] and result["date"]
    assert [p["tokens"] for p in result["prefill"]] == [8, 16]  # 100 does not fit 64 positions: skipped, said so
    assert any("prompt length 100 skipped" in note for note in result["notes"])
    assert all(p["tokens_per_s"] > 0 and p["seconds"] > 0 for p in result["prefill"])
    assert result["decode_prompt_tokens"] == 8 and result["decode_tokens"] == 8 and result["ttft_s"] > 0
    assert [(d["batch"], d["through"]) for d in result["decode"]] == [(1, "Model.stream"), (2, "Engine")]
    assert all(d["tokens_per_s"] > 0 for d in result["decode"])
    # No other test uses this cache length, so every step compiles here, in warm-up, and never after it.
    assert set(result["compile_s"]) == {"prefill batch 1, bucket 16", "decode batch 1",
                                        "prefill batch 2, bucket 16", "decode batch 2"}
    assert all(seconds > 0 for seconds in result["compile_s"].values())
    assert result["recompilations"] == 0
    assert result["peak_memory_bytes"] is None if jax.default_backend() == "cpu" else result["peak_memory_bytes"] > 0

    hf = result["hf"]
    assert hf["device"] == "cpu" and hf["torch_threads"] >= 1 and [p["tokens"] for p in hf["prefill"]] == [8, 16]
    assert all(p["tokens_per_s"] > 0 for p in hf["prefill"]) and hf["ttft_s"] > 0 and hf["decode_tokens_per_s"] > 0

    assert "| prefill 16 tokens, tokens/s" in out and "| recompilations after warm-up" in out
    header = next(line for line in out.splitlines() if line.startswith("|"))
    assert "transformers" in header and "speed-up" in header
    assert "compiling" in err and "measuring" in err  # progress goes to stderr


def test_a_compile_in_the_timed_runs_is_counted(monkeypatch):
    """Provoke one compilation per call of the prefill timing: the warm-up call's is not counted, each timed
    run's is."""
    real = bench._first_token_seconds
    calls = []

    def first_token_seconds_that_compiles(*args):
        calls.append(len(calls))
        jax.jit(lambda x: x + 1)(np.zeros(1, np.float32))  # a new function object: a jit cache miss each call
        return real(*args)

    monkeypatch.setattr(bench, "_first_token_seconds", first_token_seconds_that_compiles)
    # A cache length of its own: its steps compile in its warm-up (not counted) whichever test runs first.
    model = qj.random_model(qj.preset("tiny").replace(num_layers=1), max_seq_len=48, std=0.2)
    result = run_bench(model, "tiny", prompt_lengths=[8], decode_tokens=4, batch_sizes=[], repeats=3)
    assert len(calls) == 1 + 3 and result.recompilations == 3

    table = format_table(result)  # without a comparison: one column of figures, memory n/a on CPU
    assert "transformers" not in table and "| decode, batch 1 (Model.stream), tokens/s" in table
    if jax.default_backend() == "cpu":
        assert "| peak device memory" in table and "n/a" in table


def test_the_cache_bounds_what_is_measured():
    model = qj.random_model("tiny", max_seq_len=32)
    with pytest.raises(qj.ConfigError, match="no prompt length fits"):
        run_bench(model, "tiny", prompt_lengths=[32, 64])
    with pytest.raises(qj.ConfigError, match="no room to decode"):
        run_bench(model, "tiny", prompt_lengths=[31])
    with pytest.raises(qj.ConfigError, match="batch sizes"):
        run_bench(model, "tiny", prompt_lengths=[8], batch_sizes=[0])


def test_bench_cli_rejects_bad_arguments(capsys, tmp_path):
    assert main(["bench", "--json", str(tmp_path / "missing" / "out.json")]) == 2  # before the long run, not after
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--layers", "2"]) == 2  # the bundled model has no preset to cut
    assert "--layers applies to --preset only" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--layers", "9"]) == 2
    assert "--layers must be in 1..3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--prompt-lengths", "16,many"])


def test_transformers_model_holds_the_same_weights():
    """The comparison's model computes what ours does: logits agree to float32 rounding, and in bfloat16 the
    weights arrive bit for bit (the experts fused by transformers into its own layout)."""
    model = qj.random_model("tiny", seed=3, std=0.2)
    ids = [5, 17, 42, 200, 3, 99, 7]
    with torch.no_grad():
        theirs = transformers_model(model)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, model.logits(ids), atol=1e-4, rtol=1e-4)

    model = qj.random_model("tiny", dtype="bfloat16", seed=3, std=0.2)
    hf = transformers_model(model)
    assert hf.dtype == torch.bfloat16
    ours = model.params.layers[0].mlp  # layer 0 is MoE in the tiny preset
    gate_up = hf.model.layers[0].mlp.experts.gate_up_proj.detach().float().numpy()  # [experts, 2 * ffn, embed]
    ffn = ours.gate.shape[-1]
    np.testing.assert_array_equal(gate_up[:, :ffn], np.asarray(ours.gate, np.float32).transpose(0, 2, 1))
    np.testing.assert_array_equal(gate_up[:, ffn:], np.asarray(ours.up, np.float32).transpose(0, 2, 1))
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().float().numpy(),
                                  np.asarray(model.params.embed, np.float32))
