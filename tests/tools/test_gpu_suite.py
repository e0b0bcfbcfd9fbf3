"""`qwen3moe-jax bench --suite gpu` (scripts/gpu_check.sh) as a CPU dry run at a small preset, and its device-drawn
int8 weights against the host quantizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.model.moe import MOE_KERNELS
from qwen3moe_jax.model.quant import quantize
from qwen3moe_jax.tools.cli import main
from qwen3moe_jax.tools.gpu_suite import _draw


def test_weights_quantized_on_the_device_equal_the_host_quantizer():
    key, std = jax.random.key(3), jnp.float32(0.02)
    floats = np.asarray(_draw(key, std, (6, 40, 24), "matrix", "float32", None))
    on_device = _draw(key, std, (6, 40, 24), "matrix", "float32", (1,))  # the same draw, quantized there
    on_host = quantize(floats, (1,))
    # XLA divides by 127 as a multiply by its reciprocal: a scale may differ in the last bit, and a value whose
    # w / scale sits on a .5 may then round the other way. The rounding bound holds either way.
    values, scale = np.asarray(on_device.values, np.int64), np.asarray(on_device.scale, np.float64)
    np.testing.assert_allclose(scale, on_host.scale, rtol=2e-7)
    assert np.abs(values - on_host.values).max() <= 1 and np.mean(values == on_host.values) > 0.99
    assert np.all(np.abs(floats - values * scale) <= scale * (0.5 + 1e-5))


def test_gpu_suite_dry_run_writes_every_figure(tmp_path, capsys):
    assert main(["bench", "--suite", "gpu", "--preset", "tiny", "--layers", "1", "--suite-dtypes", "bfloat16",
                 "--prompt-lengths", "16,24", "--batch-sizes", "2", "--decode-tokens", "4", "--repeats", "1",
                 "--hf-layers", "1", "--prefill-chunk", "16", "--out-dir", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*.json")
    assert json_path.with_suffix(".md").read_text() in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    assert report["platform"] == jax.default_backend() and report["layers"] == 1 and report["init_s"]["bfloat16"] > 0

    ran = {(k["kernel"], k["tokens"]) for k in report["kernels"] if k["ms"] is not None and k["ms"] > 0}
    # decode 1 and 2, a chunk; "cpu", the C++ kernel for float32 weights on the CPU, not on these bfloat16 ones
    assert ran == {(kernel, tokens) for kernel in MOE_KERNELS if kernel != "cpu" for tokens in (1, 2, 16)}
    assert {k["note"] for k in report["kernels"] if k["kernel"] == "cpu"} == {
        "not run: float32 weights on the CPU backend only"}
    assert {k["runs_as"] for k in report["kernels"] if k["kernel"] == "auto"} == {"gather", "blocked"}
    # Each kernel computes the gather kernel's block: bfloat16 rounding apart, a wrong kernel would show here.
    errors = {(k["kernel"], k["tokens"]): k["error_vs_gather"] for k in report["kernels"] if k["ms"] is not None}
    assert all(errors[("gather", tokens)] == 0 for tokens in (1, 2, 16))
    assert max(errors.values()) < 2e-2, errors
    assert "| error |" in json_path.with_suffix(".md").read_text()

    single, batches = report["runs"]["bfloat16"]["batch 1"], report["runs"]["bfloat16"]["batches"]
    assert [p["tokens"] for p in single["prefill"]] == [16, 24] and single["max_seq_len"] == 24 + 4
    assert [d["batch"] for d in batches["decode"]] == [1, 2] and all(d["tokens_per_s"] > 0 for d in batches["decode"])
    assert report["batch_prefill"]["bfloat16"]["batch"] == 2 and report["batch_prefill"]["bfloat16"]["seconds"] > 0
    assert report["hf"]["hf"]["decode_tokens_per_s"] > 0  # transformers on the same weights, one layer
    assert {t["target"] for t in report["targets"]} >= {"bfloat16 decode batch 1, tokens/s",
                                                        "no recompilation after warm-up"}
    assert next(t for t in report["targets"] if t["target"] == "no recompilation after warm-up")["met"]
