"""The MoE kernels' costs (their results are checked against transformers in test_parity_hf.py): what "auto" picks
per backend, a decode step that reads only the chosen experts' weights (timed, 8 against 128 experts), and prefill
temporary memory that does not grow with tokens x experts (XLA's memory analysis of the compiled block)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from functools import partial

import jax
import jax.numpy as jnp
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model import backend, cpu_kernels
from qwen3moe_jax.model.moe import choose_moe_kernel, moe_local
from qwen3moe_jax.model.params import MoEParams
from qwen3moe_jax.model.quant import QuantizedWeight

# The 30B-A3B's expert widths and top 8, at two expert counts.
HIDDEN, FFN, TOP_K = 2048, 768, 8


def block_config(experts: int, kernel: str) -> qj.ModelConfig:
    return qj.preset("qwen3-30b-a3b").replace(num_experts=experts, num_experts_per_tok=TOP_K, moe_kernel=kernel)


@pytest.mark.parametrize("backend, pairs, expected", [
    ("gpu", 8, "gather"), ("gpu", 32 * 8, "blocked"), ("gpu", 8192, "blocked"),
    ("cpu", 8, "gather"), ("cpu", 8192, "blocked"),  # weights unknown: see the next test for float32 ones
    ("tpu", 8, "ragged"), ("tpu", 8192, "ragged"),
])
def test_auto_is_never_ragged_dot_off_tpu(monkeypatch, backend, pairs, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert choose_moe_kernel("auto", pairs, 128) == expected
    assert choose_moe_kernel("pallas", pairs, 128) == "pallas"  # a named kernel is taken as named
    with pytest.raises(qj.ConfigError, match="moe_kernel must be one of"):
        choose_moe_kernel("dense", pairs, 128)


def test_auto_takes_the_cpu_kernel_for_float32_decode_on_the_cpu():
    """The C++ kernel (cpu_kernels.py) where it applies, once built (the Engine builds it on the CPU backend): a
    decode step's pairs, float32 weights, the CPU backend."""
    assert cpu_kernels.build() is None, "this machine has a C++ compiler: the kernels must build"
    f32, bf16 = (jax.ShapeDtypeStruct((128, 64, 32), dtype) for dtype in (jnp.float32, jnp.bfloat16))
    assert choose_moe_kernel("auto", 8, 128, f32) == "cpu"
    assert choose_moe_kernel("auto", 8, 128, bf16) == "gather"
    assert choose_moe_kernel("auto", 8192, 128, f32) == "blocked"  # prefill: whole blocks per expert
    with pytest.raises(ConfigError, match="float32 expert weights on the CPU backend"):
        qj.random_model("tiny", dtype="bfloat16", moe_kernel="cpu")


def test_without_a_compiler_auto_falls_back_to_the_gather_and_cpu_is_refused(tmp_path):
    """Where the kernel cannot be compiled, "auto" keeps XLA's gather (with one warning saying why, when a model's
    engine tries to build it) and an explicit moe_kernel="cpu" is a ConfigError naming the reason. A fresh process:
    the build is tried once per process."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, qwen3moe_jax as qj
        from qwen3moe_jax.model.moe import choose_moe_kernel
        model = qj.random_model("tiny")
        assert choose_moe_kernel("auto", 8, 128, jax.ShapeDtypeStruct((128, 64, 32), jnp.float32)) == "gather"
        assert len(model.generate([1, 2, 3], 4)) == 4
        try:
            qj.random_model("tiny", moe_kernel="cpu")
        except qj.ConfigError as e:
            print("refused:", e)
    """)
    env = dict(os.environ, CXX="false", XDG_CACHE_HOME=str(tmp_path), PATH="/nonexistent")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: moe_kernel 'cpu' cannot run here: no C++ compiler found" in done.stdout
    assert "The CPU decode kernels are not available, XLA's own ops run instead" in done.stderr


@pytest.fixture(scope="module")
def expert_blocks_8_and_128() -> dict[int, MoEParams]:
    """float32 blocks of 8 and 128 experts, made on the device. The values of the expert weights do not change
    what a step reads, so they are constant (a fill, not 2.4 GB of random draws); the router is random."""

    @jax.jit
    def make(router: jax.Array) -> MoEParams:
        X = router.shape[1]
        return MoEParams(router=router, gate=jnp.full((X, HIDDEN, FFN), 0.02), up=jnp.full((X, HIDDEN, FFN), 0.01),
                         down=jnp.full((X, FFN, HIDDEN), 0.02))

    return {x: make(jax.random.normal(jax.random.key(x), (HIDDEN, x))) for x in (8, 128)}


@pytest.mark.parametrize("kernel", ["gather", "blocked", "cpu"])
def test_a_decode_step_reads_only_the_chosen_experts(kernel, expert_blocks_8_and_128):
    """One token, top 8 (8 rows of (token, expert) pairs): the block with 128 experts costs at most 3x the block
    with 8, the same widths (2048 x 768) and k. Reading every expert's weights, as ragged_dot's lowerings do, costs
    16x the bytes (measured here for ragged: 7-11x). The pallas kernel does not claim this off GPU: Pallas'
    interpreter carries each whole operand through its grid loop.
    Timed interleaved (8, 128, 8, 128, ...) and compared by the fastest of 9 rounds each: load from other processes
    hits both and only ever adds time (medians of 5 once gave the gather 3.2x on a quiet CI run, 0.6x otherwise)."""
    x = jax.random.normal(jax.random.key(1), (1, 1, HIDDEN))
    steps = {}
    for experts, params in expert_blocks_8_and_128.items():
        step = jax.jit(partial(moe_local, config=block_config(experts, kernel)))
        step(params, x)[0].block_until_ready()  # compile
        steps[experts] = (step, params)
    times: dict[int, list[float]] = {8: [], 128: []}
    for _ in range(9):
        for experts, (step, params) in steps.items():
            start = time.perf_counter()
            step(params, x)[0].block_until_ready()
            times[experts].append(time.perf_counter() - start)
    ratio = min(times[128]) / min(times[8])
    print(f"{kernel}: decode MoE block, 128 experts / 8 experts = {ratio:.2f}")
    assert ratio <= 3


def _temp_bytes(kernel: str, tokens: int, experts: int) -> int:
    """XLA's temporary buffer bytes for the compiled MoE block over `tokens` float32 tokens (nothing is allocated)."""
    S = jax.ShapeDtypeStruct
    params = MoEParams(router=S((HIDDEN, experts), jnp.float32), gate=S((experts, HIDDEN, FFN), jnp.float32),
                       up=S((experts, HIDDEN, FFN), jnp.float32), down=S((experts, FFN, HIDDEN), jnp.float32))
    lowered = jax.jit(moe_local, static_argnames="config").lower(
        params, S((1, tokens, HIDDEN), jnp.float32), block_config(experts, kernel))
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kernel, holds", [("auto", True), ("pallas", True), ("ragged", False)])
def test_prefill_temporary_memory_does_not_grow_with_tokens_times_experts(kernel, holds):
    """Temp memory at 256 and 1024 tokens, 8 and 128 experts: the part that grows with both together (the
    interaction, temp(1024, 128) - temp(1024, 8) - temp(256, 128) + temp(256, 8)) is under a quarter of what a
    [tokens x k, experts, FFN] float32 buffer (the dense form) adds over the same steps. What is left grows with the
    tokens (a chunk's rows) or with the experts (their weights), each on its own. XLA:CPU's ragged_dot fails
    this (2.7x the dense form's growth, measured): the check can tell."""
    temp = {(t, x): _temp_bytes(kernel, t, x) for t in (256, 1024) for x in (8, 128)}
    interaction = temp[1024, 128] - temp[1024, 8] - temp[256, 128] + temp[256, 8]
    dense = (1024 - 256) * TOP_K * (128 - 8) * FFN * 4
    mib = {k: v >> 20 for k, v in temp.items()}
    print(f"{kernel}: temp MiB {mib}, interaction / dense {interaction / dense:.2f}")
    assert (interaction < dense / 4) == holds


def test_auto_takes_pallas_for_int4_experts_on_a_gpu_and_keeps_the_others_on_xla():
    """Compiled for an H100 (qwen3moe-jax aot), XLA wrote the blocked form's int4 expert blocks out dequantized
    before its matmuls, where its GEMM fusions read int8 in place; the Pallas kernel reads int4 in place."""
    int4 = QuantizedWeight(jax.ShapeDtypeStruct((128, 32, 32), jnp.uint8), jax.ShapeDtypeStruct((128, 2, 32),
                                                                                                jnp.float16))
    int8 = QuantizedWeight(jax.ShapeDtypeStruct((128, 64, 32), jnp.int8), jax.ShapeDtypeStruct((128, 1, 32),
                                                                                               jnp.float32))
    floats = jax.ShapeDtypeStruct((128, 64, 32), jnp.bfloat16)
    with backend.tracing_for("gpu"):
        assert [choose_moe_kernel("auto", pairs, 128, int4) for pairs in (8, 8192)] == ["pallas", "pallas"]
        for weights in (int8, floats):
            assert [choose_moe_kernel("auto", pairs, 128, weights) for pairs in (8, 8192)] == ["gather", "blocked"]
    assert choose_moe_kernel("auto", 8, 128, int4) == "gather"  # on this CPU
