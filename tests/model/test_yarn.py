"""YaRN rope scaling: transformers' frequencies and logits past the original context, read from config.json and
from llama.cpp's GGUF keys, written back by both writers; other rope types refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Qwen3MoeConfig

import qwen3moe_jax as qj
from qwen3moe_jax.io.gguf_file import GGUFTensors
from qwen3moe_jax.model.config import ModelConfig, Yarn
from qwen3moe_jax.model.transformer import rope_frequencies
from qwen3moe_jax.tools.parity import hf_logits
from tests.hf_reference import save_hf_model

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, vocab_size=256,
             max_position_embeddings=1024)
BASE = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def yarn_checkpoint(tmp_path_factory):
    """A random HF Qwen3-MoE with yarn factor 4 over 256 original positions, its logits over 900 tokens (ours
    from qj.load, and transformers'), and the prompt."""
    path = tmp_path_factory.mktemp("yarn_hf")
    hf = save_hf_model(path, seed=3, rope_parameters=YARN, **SHAPE)
    ids = np.random.default_rng(0).integers(0, 256, 900).tolist()
    model = qj.load(path, max_seq_len=1024, progress=False)
    return path, hf, model, ids, hf_logits(hf, ids)


def test_yarn_logits_equal_transformers_beyond_the_original_context(yarn_checkpoint):
    """Done-when of issue 35: relative error <= 1e-4 (float32) over a 900-token prompt, 3.5x the original 256."""
    _, hf, model, ids, ref = yarn_checkpoint
    assert model.config.rope_scaling == Yarn(4.0, 256)
    inv_freq, scale = rope_frequencies(model.config)
    np.testing.assert_array_equal(np.asarray(inv_freq), hf.model.rotary_emb.inv_freq.numpy())
    assert scale == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)

    ours = model.logits(ids)
    err, late = relative_error(ours, ref), relative_error(ours[256:], ref[256:])
    print(f"yarn, 900 tokens: relative error {err:.2e} overall, {late:.2e} past position 256")
    assert err <= 1e-4 and late <= 1e-4
    # The same weights with the default rotary are far off: the scaling is what makes the match.
    plain = qj.Model(model.config.replace(rope_scaling=None), model.params, None, 1024)
    assert relative_error(plain.logits(ids), ref) > 0.1


def test_gguf_with_llamacpp_yarn_keys_gives_the_same_logits(yarn_checkpoint, tmp_path):
    _, _, model, ids, ref = yarn_checkpoint
    qj.save_gguf(model, tmp_path / "yarn.gguf", "F32", with_tokenizer=False)
    fields = GGUFTensors(tmp_path / "yarn.gguf").fields
    assert fields["qwen3moe.rope.scaling.type"] == "yarn"  # llama.cpp's names (gguf.Keys.Rope)
    assert fields["qwen3moe.rope.scaling.factor"] == 4.0
    assert fields["qwen3moe.rope.scaling.original_context_length"] == 256
    assert "qwen3moe.rope.scaling.attn_factor" not in fields  # YaRN's own factor, which llama.cpp applies itself

    back = qj.load(tmp_path / "yarn.gguf", max_seq_len=1024, progress=False)
    assert back.config.rope_scaling == model.config.rope_scaling
    err = relative_error(back.logits(ids), ref)
    print(f"yarn GGUF, 900 tokens: relative error {err:.2e}")
    assert err <= 1e-4


def test_explicit_attention_factor_and_betas_round_trip_through_gguf_and_config_json(tmp_path):
    yarn = Yarn(8.0, 512, beta_fast=16.0, beta_slow=2.0, attention_factor=1.25)
    tiny = qj.preset("tiny").replace(mlp_only_layers=())  # GGUF qwen3moe has no dense layers
    model = qj.random_model(tiny.replace(rope_scaling=yarn, max_position_embeddings=4096))
    qj.save_gguf(model, tmp_path / "m.gguf", "F32", with_tokenizer=False)
    back = qj.load(tmp_path / "m.gguf", progress=False).config.rope_scaling
    assert (back.factor, back.original_max_position_embeddings, back.beta_fast, back.beta_slow) == (8.0, 512, 16, 2)
    assert back.attention_factor == pytest.approx(1.25, rel=1e-6)  # stored as float32 over YaRN's own factor

    hf = Qwen3MoeConfig(**model.config.to_hf_dict())  # transformers reads our config.json fields as they are
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["attention_factor"] == 1.25
    assert ModelConfig.from_hf_dict(hf.to_dict()) == model.config


def test_transformers4_rope_scaling_and_defaults():
    c = ModelConfig.from_hf_dict({**BASE, "rope_theta": 1e6, "max_position_embeddings": 131072, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert c.rope_scaling == Yarn(4.0, 32768, 32.0, 1.0, None) and c.rope_theta == 1e6
    assert c.rope_scaling.scale == pytest.approx(0.1 * np.log(4) + 1)
    # transformers' rule: no factor means max_position_embeddings / original
    c = ModelConfig.from_hf_dict({**BASE, "max_position_embeddings": 2048, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "original_max_position_embeddings": 256}})
    assert c.rope_scaling.factor == 8.0


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "linear", "factor": 2.0}, "rope_type 'linear' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_type 'llama3' is not supported"),
    ({"type": "longrope", "short_factor": [1.0]}, "rope_type 'longrope' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0}, "needs original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": -1.0, "original_max_position_embeddings": 256}, "factor must be a positive"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "truncate": False}, "truncate"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "low_freq": 1}, "low_freq"),
])
def test_other_rope_types_and_bad_yarn_fields_are_refused_by_name(rope, message):
    with pytest.raises(qj.ConfigError, match=message):
        ModelConfig.from_hf_dict({**BASE, "rope_parameters": rope})


@pytest.mark.parametrize("fields,message", [
    ({"qwen3moe.rope.scaling.type": "linear", "qwen3moe.rope.scaling.factor": 2.0}, "'linear' is not supported"),
    ({"qwen3moe.rope.scaling.type": "yarn", "qwen3moe.rope.scaling.factor": 4.0}, "original_context_length"),
    ({"qwen3moe.rope.scaling.type": "yarn", "qwen3moe.rope.scaling.factor": 4.0,
      "qwen3moe.rope.scaling.original_context_length": 64, "qwen3moe.rope.scaling.yarn_log_multiplier": 0.1},
     "yarn_log_multiplier"),
])
def test_gguf_rope_scaling_other_than_yarn_is_refused(tmp_path, fields, message):
    """A GGUF file whose rope.scaling keys this model would run differently fails to load, naming the key."""
    from gguf import GGUFValueType, GGUFWriter

    from qwen3moe_jax.io.checkpoint import float32_arrays
    from qwen3moe_jax.io.gguf_write import write_gguf

    model = qj.random_model(qj.preset("tiny").replace(mlp_only_layers=()))
    write_gguf(tmp_path / "plain.gguf", model.config, float32_arrays(model.params))
    tensors = GGUFTensors(tmp_path / "plain.gguf")
    writer = GGUFWriter(str(tmp_path / "m.gguf"), "qwen3moe")
    for key, value in {**{k: v for k, v in tensors.fields.items() if k.startswith("qwen3moe.")}, **fields}.items():
        kind = (GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32 if isinstance(value, int)
                else GGUFValueType.FLOAT32)
        writer.add_key_value(key, value, kind)
    for name, tensor in tensors.tensors.items():
        writer.add_tensor(name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(qj.ConfigError, match=message):
        qj.load(tmp_path / "m.gguf", progress=False)
