"""GGUF files of llama.cpp's `qwen3moe` architecture (or its dense `qwen3`, for a model without experts), written
(F32, F16, BF16, Q8_0, Q4_0): weights, config, tokenizer and chat template. llama.cpp's qwen3moe graph always
renormalises the top-k router weights and has no dense MLP layers; the writer refuses configs it cannot express."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, RopeScalingType, quants

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.io.gguf_file import ARCH, DENSE_ARCH, Q, gguf_name, to_gguf_layout
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.config import ModelConfig

WRITABLE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def check_gguf_expressible(config: ModelConfig) -> None:
    """llama.cpp's qwen3moe cannot run dense layers or un-renormalised top-k; refuse rather than mislead. A model
    without experts is a dense qwen3."""
    if not config.num_experts:
        return
    if not config.norm_topk_prob:
        raise ConfigError("GGUF qwen3moe always renormalises top-k router weights; this model has norm_topk_prob=False")
    if not all(config.is_moe_layer(i) for i in range(config.num_layers)):
        raise ConfigError("GGUF qwen3moe has no dense MLP layers; this model has some (mlp_only_layers/sparse step)")


def write_gguf(
    path: str | Path,
    config: ModelConfig,
    named_arrays: dict[str, np.ndarray],
    qtype: str = "F32",
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write params (our names -> numpy arrays in our layout), and the tokenizer with its chat template
    when given, as a qwen3moe GGUF file (qwen3 for a model without experts).

    Matrices are stored in `qtype`; norm vectors stay F32 as llama.cpp's converter keeps them. A matrix
    whose rows do not divide into the type's blocks is stored F32.
    """
    if qtype not in WRITABLE_TYPES:
        raise ConfigError(f"GGUF type {qtype!r} is not writable; choose one of {', '.join(WRITABLE_TYPES)}")
    check_gguf_expressible(config)
    target = WRITABLE_TYPES[qtype]
    block = quants.GGML_QUANT_SIZES[target][0]
    c = config
    writer = GGUFWriter(str(path), ARCH if c.num_experts else DENSE_ARCH)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling is not None:  # llama.cpp's keys; read back by gguf_file.read_gguf_rope_scaling
        yarn = c.rope_scaling
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn.factor)
        writer.add_rope_scaling_orig_ctx_len(yarn.original_max_position_embeddings)
        if (yarn.beta_fast, yarn.beta_slow) != (32.0, 1.0):
            writer.add_rope_scaling_yarn_beta_fast(yarn.beta_fast)
            writer.add_rope_scaling_yarn_beta_slow(yarn.beta_slow)
        if yarn.attention_factor is not None:  # llama.cpp multiplies its attn_factor by YaRN's own factor
            writer.add_rope_scaling_attn_factors(yarn.attention_factor / yarn.mscale)
    if c.num_experts:
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_file_type(FILE_TYPES[qtype])
    if tokenizer is not None:
        _add_tokenizer(writer, config, tokenizer)
    for name, array in named_arrays.items():
        data = np.ascontiguousarray(to_gguf_layout(name, np.asarray(array, np.float32)))
        if data.ndim == 1 or target == Q.F32 or data.shape[-1] % block:
            writer.add_tensor(gguf_name(name, c), data)
        else:
            writer.add_tensor(gguf_name(name, c), quants.quantize(data, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: GGUFWriter, config: ModelConfig, tokenizer: Tokenizer) -> None:
    vocab = tokenizer.to_gguf_vocab(config.vocab_size)
    if not vocab.merges:  # the gguf writer drops empty arrays, and llama.cpp refuses a BPE file without merges
        raise ConfigError("this tokenizer has no BPE merges, which a GGUF file cannot carry; save without it")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        writer.add_eos_token_id(config.eos_token_ids[0])
    pad = tokenizer.token_id("<|endoftext|>")
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)  # Qwen prompts start without a BOS token
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
