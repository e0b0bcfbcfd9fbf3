"""`qwen3moe-jax aot`: the serving programs of the 30B-A3B shape (cut to 2 layers, for time) compiled for an H100
on this CPU machine, through the CUDA plugin of the `aot` extra. The plugin lives in a venv of its own (`make test`
makes .venv-aot and names its python in QWEN3MOE_JAX_AOT_PYTHON; these tests skip without it), since once
installed it logs CUDA's absence at every `import jax`. The programs are the warm-up's, the memory figures add up,
and each check can fail: "ragged" shows its dense expert tensors, XLA's blocked int4 form its dequantized weights,
and a configuration too large is refused with the reason."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.model.params import abstract_params
from qwen3moe_jax.runtime.engine import Engine
from qwen3moe_jax.tools.plan import plan

CUT = ["--target", "h100", "--preset", "qwen3-30b-a3b", "--layers", "2", "--context", "256"]


AOT_PYTHON = os.environ.get("QWEN3MOE_JAX_AOT_PYTHON", "")
pytestmark = pytest.mark.skipif(not Path(AOT_PYTHON).is_file(), reason="no python with the aot extra's CUDA plugin "
                                "(QWEN3MOE_JAX_AOT_PYTHON, which make test sets)")


def aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AOT_PYTHON, "-m", "qwen3moe_jax", "aot", *args], capture_output=True, text=True,
                          timeout=900, env=os.environ | {"JAX_PLATFORMS": "cpu"})


def run(tmp_path, *args: str) -> tuple[int, dict, str]:
    """`aot` on the cut with these arguments: its exit status, its JSON and what it printed."""
    out = tmp_path / "aot.json"
    done = aot(*CUT, *args, "--json", str(out))
    assert out.exists(), done.stderr[-3000:]
    return done.returncode, json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def bfloat16(tmp_path_factory):
    return run(tmp_path_factory.mktemp("aot"), "--batch", "1", "--batch", "32")


def test_it_compiles_the_warm_up_s_programs_and_their_memory_adds_up(bfloat16):
    status, report, printed = bfloat16
    assert status == 0 and report["target"] == "h100" and report["device_bytes"] == 84942979072
    config = qj.preset("qwen3-30b-a3b").replace(num_layers=2)
    for batch in (1, 32):
        warm_up = [what for what, _, _ in Engine(abstract_params(config, "bfloat16"), config, 256, batch)
                   .warmup_programs(256, None, all_buckets=True)]
        programs = [p for p in report["programs"] if p["batch"] == batch]
        assert [p["what"] for p in programs] == warm_up
        weights_and_cache = plan(config, {}, "bfloat16", 256, batch).per_device
        for p in programs:
            assert p["fits"] and p["dense_expert_tensors"] == [] and p["dequant_materialized"] is None
            assert p["peak_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
            # the arguments: the weights, the cache and a few small inputs; the cache comes back in place
            assert weights_and_cache <= p["argument_bytes"] < weights_and_cache * 1.01
            assert p["alias_bytes"] >= plan(config, {}, "bfloat16", 256, batch).cache_per_device
            assert any("triton" in call for call in p["custom_calls"]) and p["compile_s"] > 0
    kernels = {(p["what"], p["batch"]): p["moe_kernel"] for p in report["programs"]}
    assert kernels[("decode window 256", 1)] == "gather"  # 8 pairs over 128 experts: the chosen experts only
    assert kernels[("decode window 256", 32)] == "blocked"  # 256 pairs: whole blocks per expert
    assert kernels[("prefill chunk 128 (window 256)", 1)] == "blocked"
    assert "| decode window 256 | 32 | blocked |" in printed and "HBM-bound decode estimate" in printed


def test_ragged_shows_its_dense_expert_tensors_and_larger_temporaries(bfloat16, tmp_path):
    status, report, _ = run(tmp_path, "--batch", "1", "--warmup-tokens", "16", "--moe-kernel", "ragged")
    assert status == 0
    auto = {p["what"]: p for p in bfloat16[1]["programs"] if p["batch"] == 1}
    for p in report["programs"]:
        assert p["moe_kernel"] == "ragged" and p["dense_expert_tensors"], p
    prefill = next(p for p in report["programs"] if p["name"] == "prefill")
    assert prefill["temp_bytes"] > 4 * auto[prefill["what"]]["temp_bytes"]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_weights_are_read_in_place(tmp_path, dtype):
    """On a GPU no weight is written out dequantized. int8 experts go through XLA's gather and blocked forms, whose
    GEMM fusions read int8 as stored, as do attention's (the steps of quantized params compile without XLA's
    DotMerger, which wrote q, k and v out as bfloat16 to concatenate them); int4 experts go through the Pallas
    kernel (Triton), and int4 attention and lm_head through the Pallas matmul, which read the packed bytes. XLA's
    blocked form with int4 shows the check failing, which is why "auto" does not take it there."""
    status, report, _ = run(tmp_path, "--batch", "1", "--batch", "32", "--warmup-tokens", "16", "--dtype", dtype)
    assert status == 0
    for p in report["programs"]:
        if dtype == "int4":
            assert p["moe_kernel"] == "pallas" and "__gpu$xla.gpu.triton" in p["custom_calls"]
        else:  # 16-token chunks and one-row steps: no more pairs than experts; 32 rows: 256 pairs
            assert p["moe_kernel"] == ("blocked" if p["name"] == "decode" and p["batch"] == 32 else "gather")
        assert p["dequant_materialized"] is False and p["dequant_buffers"] == [], p
    if dtype == "int4":
        _, blocked, _ = run(tmp_path, "--batch", "32", "--warmup-tokens", "16", "--dtype", dtype, "--moe-kernel",
                            "blocked")
        config = qj.preset("qwen3-30b-a3b")
        expert_block = {(config.hidden_size * config.moe_intermediate_size) * n for n in range(1, 129)}
        found = [b for p in blocked["programs"] for b in p["dequant_buffers"]
                 if math.prod(map(int, re.search(r"\[([\d,]+)\]", b)[1].split(","))) in expert_block]
        assert found, blocked["programs"]


def test_a_configuration_that_cannot_fit_is_refused_with_the_reason_before_compiling():
    done = aot("--target", "a100", "--batch", "64", "--context", "32768")
    assert done.returncode == 1
    assert "bfloat16 params (61.1 GB) and a KV cache of 64 x 32768 tokens (206.2 GB) exceed" in done.stderr
