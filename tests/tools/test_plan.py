"""`qwen3moe-jax plan`: per-device bytes from the sharding rules, checked against arithmetic and real arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.model.params import param_count
from qwen3moe_jax.tools.cli import main
from qwen3moe_jax.tools.plan import plan


def on_first_device(arrays, mesh) -> int:
    return sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == mesh.devices.flat[0])


def test_plan_matches_the_bytes_of_a_sharded_model():
    """The plan's per-device bytes equal what the arrays of a model loaded on that mesh hold on device 0."""
    mesh = qj.make_mesh(expert=2, tensor=4)
    for dtype, kv_dtype in (("float32", "model"), ("int8", "model"), ("float32", "int8")):
        model = qj.random_model("tiny", dtype=dtype, max_seq_len=64, mesh=mesh, kv_dtype=kv_dtype)
        model.generate([1, 2, 3], 2, stop_token_ids=[])  # allocates the cache
        cache = model.engine.cache
        expected = plan(model.config, {"expert": 2, "tensor": 4}, dtype, context=64, batch=1, kv_dtype=kv_dtype)
        assert expected.params_per_device == on_first_device(jax.tree.leaves(model.params), mesh)
        assert expected.cache_per_device == on_first_device(cache.arrays, mesh)


def test_int4_plan_matches_the_bytes_of_a_sharded_model():
    """int4 at the small preset (tiny's expert FFN of 32 is one group, which tensor=2 cannot split): packed bytes,
    float16 group scales, bfloat16 for the rest, as the arrays on device 0 hold them."""
    mesh = qj.make_mesh(expert=2, tensor=2)
    model = qj.random_model("small", dtype="int4", max_seq_len=64, mesh=mesh)
    expected = plan(model.config, {"expert": 2, "tensor": 2}, "int4", context=64, batch=1)
    assert expected.params_per_device == on_first_device(jax.tree.leaves(model.params), mesh)


def test_plan_of_the_30b_shape_by_arithmetic():
    """bf16 on one device: every param at 2 bytes; the cache 2 (k, v) x layers x kv heads x head_dim x 2 bytes
    per token and row."""
    config = qj.preset("qwen3-30b-a3b")
    one = plan(config, {}, "bfloat16", context=32768, batch=8)
    total, _ = param_count(config)
    assert one.params_per_device == one.params_total == 2 * total
    assert one.cache_per_device == 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2 * 32768 * 8
    eight = plan(config, {"expert": 8}, "bfloat16", context=32768, batch=8)
    expert_bytes = 2 * 3 * config.num_layers * config.num_experts * config.hidden_size * config.moe_intermediate_size
    assert one.params_per_device - eight.params_per_device == expert_bytes * 7 // 8
    assert eight.cache_per_device == one.cache_per_device  # kv heads are not on the expert axis
    assert np.isclose(plan(config, {"tensor": 4}, "bfloat16", 32768, 8).cache_per_device, one.cache_per_device / 4)
    # int8 cache: one byte a value and a float16 scale per token and head, 0.508x of bfloat16 at head_dim 128
    int8 = plan(config, {}, "bfloat16", context=32768, batch=8, kv_dtype="int8")
    assert int8.cache_per_device == one.cache_per_device // 2 * (config.head_dim + 2) // config.head_dim
    assert int8.kv_dtype == "int8" and one.kv_dtype == "bfloat16"


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--preset", "qwen3-235b-a22b", "--mesh", "expert=8", "--dtype", "bfloat16",
                 "--context", "32768", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-235b-a22b" in out and "1,8,1" in out and "bfloat16" in out
    assert out.rstrip().endswith("no")  # 72.8 GB of params + 50.5 GB of cache per device: not on 80 GB
    assert main(["plan", "--preset", "qwen3-30b-a3b", "--mesh", "expert=1", "--dtype", "int8",
                 "--context", "262144"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]  # a row for each KV dtype: bfloat16 25.8 GB, int8 13.1 GB
    assert [[row.split()[i] for i in (3, 6)] for row in rows] == [["bfloat16", "25.8GB"], ["int8", "13.1GB"]]
    assert main(["plan", "--preset", "qwen3-235b-a22b", "--mesh", "expert=8", "--dtype", "bfloat16",
                 "--context", "4096", "--batch", "1", "--device-memory-gb", "141"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("yes")
    with pytest.raises(SystemExit):
        main(["plan", "--preset", "no-such-model"])
