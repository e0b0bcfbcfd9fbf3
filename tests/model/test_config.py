"""Config from Hugging Face config.json fields (transformers 4 and 5 layouts) and named presets."""

from __future__ import annotations

import pytest
from transformers import Qwen3MoeConfig

import qwen3moe_jax as qj
from qwen3moe_jax.model.config import ModelConfig

BASE = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, moe_intermediate_size=32, intermediate_size=96, num_experts_per_tok=2)


def test_transformers5_config_json_round_trips():
    hf = Qwen3MoeConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, num_experts=8, head_dim=24,
                        norm_topk_prob=True, mlp_only_layers=[0, 3], decoder_sparse_step=2,
                        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                        eos_token_id=[7, 9])
    c = ModelConfig.from_hf_dict(hf.to_dict())
    assert (c.num_experts, c.head_dim, c.rope_theta, c.tie_word_embeddings) == (8, 24, 5e5, True)
    assert (c.mlp_only_layers, c.decoder_sparse_step, c.eos_token_ids) == ((0, 3), 2, (7, 9))
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def test_transformers4_layout_top_level_rope_theta_and_default_head_dim():
    c = ModelConfig.from_hf_dict({**BASE, "num_experts": 4, "rope_theta": 1e7, "rope_scaling": None,
                                  "eos_token_id": 5})
    assert (c.rope_theta, c.head_dim, c.num_experts, c.eos_token_ids) == (1e7, 8, 4, (5,))


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "qwen3_moe"),
    ({"use_sliding_window": True}, "sliding"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok"),
])
def test_unsupported_or_inconsistent_configs_are_refused(change, message):
    with pytest.raises(qj.ConfigError, match=message):
        ModelConfig.from_hf_dict({**BASE, "num_experts": 4, **change})


def test_missing_field_is_named():
    fields = {k: v for k, v in BASE.items() if k != "hidden_size"}
    with pytest.raises(qj.ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(fields)


def test_presets():
    assert {"qwen3-30b-a3b", "qwen3-coder-30b-a3b", "qwen3-235b-a22b", "tiny"} <= set(qj.preset_names())
    coder = qj.preset("qwen3-coder-30b-a3b")
    assert (coder.rope_theta, coder.max_position_embeddings, coder.num_layers) == (1e7, 262144, 48)
    for name in ("qwen3-coder-30b-a3b", "qwen3-30b-a3b-instruct-2507"):  # native 256k: no rope scaling
        long = qj.preset(name)
        assert (long.max_position_embeddings, long.rope_theta, long.rope_scaling) == (262144, 1e7, None)
        assert long.replace(max_position_embeddings=40960, rope_theta=1e6) == qj.preset("qwen3-30b-a3b")
    yarn = qj.preset("qwen3-30b-a3b-yarn")  # Qwen's recipe for 131,072 tokens: YaRN, factor 4 over 32,768
    assert (yarn.max_position_embeddings, yarn.rope_scaling) == (131072, qj.Yarn(4.0, 32768))
    big = qj.preset("qwen3-235b-a22b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.moe_intermediate_size) == (94, 4096, 64, 1536)
    with pytest.raises(qj.ConfigError, match="known presets"):
        qj.preset("no-such-model")
