"""Hugging Face checkpoint loading: sharded and fused layouts, bf16 files, errors, progress, memory."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen3MoeForCausalLM

import qwen3moe_jax as qj
from qwen3moe_jax.tools.parity import hf_logits
from tests.hf_reference import save_hf_model

IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_with_index_loads_the_same(hf_tiny, tmp_path):
    path, hf = hf_tiny
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    sharded = qj.load(tmp_path, progress=False)
    np.testing.assert_array_equal(sharded.logits(IDS), qj.load(path, progress=False).logits(IDS))


def test_fused_expert_layout_loads_the_same(hf_tiny, tmp_path):
    """transformers 5's in-memory layout: experts.gate_up_proj [X, 2F, E] and experts.down_proj [X, E, F]."""
    path, hf = hf_tiny
    c = qj.load(path, progress=False).config
    tensors = load_file(path / "model.safetensors")
    for i in range(c.num_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        if not c.is_moe_layer(i):
            continue
        per_expert = {kind: [tensors.pop(f"{prefix}.{j}.{kind}.weight") for j in range(c.num_experts)]
                      for kind in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(per_expert["gate_proj"], per_expert["up_proj"], strict=True)])
        tensors[f"{prefix}.down_proj"] = np.stack(per_expert["down_proj"])
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(path / "config.json", fused)
    save_file(tensors, fused / "model.safetensors")
    np.testing.assert_allclose(qj.load(fused, progress=False).logits(IDS), hf_logits(hf, IDS), atol=2e-5)


def test_bfloat16_checkpoint(hf_tiny, tmp_path):
    path, hf = hf_tiny
    Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path)
    # Read as f32, the bf16 weights are exact: parity with transformers running the same file in f32.
    hf_f32 = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(qj.load(tmp_path, progress=False).logits(IDS), hf_logits(hf_f32, IDS), atol=2e-5)
    # Run in bf16, against transformers in bf16: both round differently from f32 (a router choice can
    # even flip), so the like-for-like comparison is bf16 with bf16.
    model = qj.load(tmp_path, dtype="bfloat16", progress=False)
    assert model.params.embed.dtype == np.dtype("bfloat16")
    hf_bf16 = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    err = np.abs(model.logits(IDS) - hf_logits(hf_bf16, IDS)).max()
    print(f"bf16 vs transformers bf16: max |logit error| = {err:.3f}")
    assert err < 0.1


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.k_norm.weight", "lm_head.weight"])
def test_missing_tensor_is_named(hf_tiny, tmp_path, tensor):
    """A tensor the config needs is absent (lm_head included: this checkpoint's embeddings are untied)."""
    path, _ = hf_tiny
    tensors = load_file(path / "model.safetensors")
    del tensors[tensor]
    ckpt = _copy(path, tmp_path / "ckpt")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(qj.CheckpointError, match=tensor.replace(".", r"\.")):
        qj.load(ckpt, progress=False)


def test_config_that_disagrees_with_the_tensors(hf_tiny, tmp_path):
    path, _ = hf_tiny
    ckpt = _copy(path, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["moe_intermediate_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qj.CheckpointError, match="shape"):
        qj.load(ckpt, progress=False)


def test_bad_paths_and_files(hf_tiny, tmp_path):
    with pytest.raises(qj.CheckpointError, match="does not exist"):
        qj.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(qj.CheckpointError, match="config.json"):
        qj.load(tmp_path / "empty")
    ckpt = _copy(hf_tiny[0], tmp_path / "truncated")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qj.CheckpointError):
        qj.load(ckpt, progress=False)
    with pytest.raises(qj.ConfigError, match="dtype"):
        qj.load(hf_tiny[0], dtype="int3")


def test_loading_shows_progress(hf_tiny, capsys):
    qj.load(hf_tiny[0])
    assert "loading" in capsys.readouterr().err


def test_loading_holds_about_one_tensor_in_host_memory(tmp_path):
    """Streaming: peak host allocation while loading stays far below the checkpoint size."""
    save_hf_model(tmp_path, seed=0, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                  vocab_size=512)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))  # ~55 MB
    largest_param = 8 * 256 * 256 * 4  # one layer's stacked expert tensor, f32: 2 MB
    tracemalloc.start()
    model = qj.load(tmp_path, progress=False)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # On CPU a device array may alias its numpy source, so what is still held at the end is the params
    # themselves; the transient excess over it is what loading costs on top.
    transient = peak - held
    print(f"checkpoint {size / 1e6:.1f} MB, transient host allocation while loading {transient / 1e6:.1f} MB")
    assert model.config.num_layers == 8
    assert transient < max(0.25 * size, 4 * largest_param)  # a whole-checkpoint copy would be >= size


def test_save_hf_writes_a_checkpoint_transformers_runs_the_same(tmp_path):
    """Export (tiny preset: GQA, a dense layer, byte tokenizer), then transformers runs it: same logits;
    our loader reads it back to the same params, config and tokenizer."""
    model = qj.random_model("tiny", seed=3, std=0.3)
    qj.save_hf(model, tmp_path)
    reference = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = model.encode("def add(a, b):\n    return a + b\n")
    np.testing.assert_allclose(model.logits(ids), hf_logits(reference, ids), atol=2e-5)

    again = qj.load(tmp_path, progress=False)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "<|im_start|>user\nhé 😀<|im_end|>"
    assert again.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert again.tokenizer.eos_token == model.tokenizer.eos_token
