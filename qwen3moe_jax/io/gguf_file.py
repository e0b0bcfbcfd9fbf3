"""GGUF files of llama.cpp's `qwen3moe` architecture: read (memory-mapped, dequantized tensor by tensor with
the `gguf` package) and write (F32, F16, BF16, Q8_0), weights with tokenizer and chat template.

llama.cpp's qwen3moe graph always renormalises the top-k router weights and has no dense MLP layers, so
a GGUF file means norm_topk_prob=True and every layer MoE; the writer refuses configs it cannot express.
GGUF numpy shapes are ggml's `ne` reversed, which makes every linear weight [out, in] (as in HF files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from qwen3moe_jax.config import ModelConfig
from qwen3moe_jax.errors import CheckpointError, ConfigError
from qwen3moe_jax.quant import GROUP, QuantizedWeight, int4_from_gguf_blocks
from qwen3moe_jax.tokenizer import GGUFVocab, Tokenizer

ARCH = "qwen3moe"
Q = GGMLQuantizationType
READABLE_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
WRITABLE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
INT4_TYPES = {Q.Q4_0, Q.Q4_K}  # 4-bit types whose blocks dtype="int4" keeps as stored (quant.int4_from_gguf_blocks)


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_name(name: str) -> str:
    """Our param name -> the GGUF tensor name (llama.cpp's names, kept as they are)."""
    top = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    if name in top:
        return top[name]
    _, layer, *rest = name.split(".")
    leaf = {
        "attn_norm": "attn_norm", "mlp_norm": "ffn_norm",
        "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
        "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
        "mlp.router": "ffn_gate_inp", "mlp.gate": "ffn_gate_exps", "mlp.up": "ffn_up_exps",
        "mlp.down": "ffn_down_exps",
    }[".".join(rest)]
    return f"blk.{layer}.{leaf}.weight"


def from_gguf_layout(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF numpy layout -> ours (`shape` is our spec's shape)."""
    if array.ndim == 3:  # experts: [X, out, in] -> [X, in, out]
        return array.transpose(0, 2, 1)
    if array.ndim == 2 and name != "embed":  # [out, in] -> [in, out], then heads split off (q, k, v, o)
        return array.T.reshape(shape)
    return array


def to_gguf_layout(name: str, array: np.ndarray) -> np.ndarray:
    """Ours -> GGUF numpy layout; the inverse of from_gguf_layout."""
    leaf = name.rsplit(".", 1)[-1]
    if array.ndim == 3 and leaf in ("gate", "up", "down"):
        return array.transpose(0, 2, 1)
    if leaf == "o":
        return array.reshape(-1, array.shape[-1]).T
    if array.ndim == 3:  # q, k, v: [E, H, D] -> [H*D, E]
        return array.reshape(array.shape[0], -1).T
    if array.ndim == 2 and name != "embed":
        return array.T
    return array


@dataclass(frozen=True)
class QuantizedTensor:
    """One GGUF tensor as stored: `blocks` is the memory-mapped data in GGUF's numpy layout (for block
    types, uint8 rows of blocks along the last axis). An on-device quantized path takes these as they are;
    the float path calls dequantize()."""

    name: str
    qtype: GGMLQuantizationType
    blocks: np.ndarray

    def dequantize(self) -> np.ndarray:
        return quants.dequantize(self.blocks, self.qtype)


class GGUFTensors:
    """The tensors of a memory-mapped GGUF file, read raw or dequantized on request."""

    def __init__(self, path: Path):
        try:
            self.reader = GGUFReader(path, "r")
        except Exception as err:  # the reader raises ValueError/IndexError/struct errors on damage
            raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from err
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def get(self, gguf_tensor: str) -> np.ndarray:
        """The tensor dequantized to float32 (F16/BF16 widened), in GGUF's numpy layout."""
        return self.raw(gguf_tensor).dequantize()

    def raw(self, gguf_tensor: str) -> QuantizedTensor:
        tensor = self.tensors.get(gguf_tensor)
        if tensor is None:
            raise CheckpointError(f"tensor {gguf_tensor!r} is missing from {self.path}")
        if tensor.tensor_type not in READABLE_TYPES:
            raise CheckpointError(
                f"tensor {gguf_tensor!r} in {self.path} has type {tensor.tensor_type.name}, which this loader "
                f"does not read; supported: {', '.join(sorted(t.name for t in READABLE_TYPES))}"
            )
        return QuantizedTensor(gguf_tensor, tensor.tensor_type, tensor.data)


def read_gguf_config(tensors: GGUFTensors) -> ModelConfig:
    arch = tensors.field("general.architecture")
    if arch != ARCH:
        raise ConfigError(f"{tensors.path} has architecture {arch!r}; this package runs {ARCH!r}")

    def key(name: str, default: Any = None) -> Any:
        value = tensors.field(f"{ARCH}.{name}", default)
        if value is None:
            raise CheckpointError(f"{tensors.path} lacks the metadata key {ARCH}.{name}")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    eos = tensors.field("tokenizer.ggml.eos_token_id")
    vocab = tensors.field("tokenizer.ggml.tokens")
    return ModelConfig(
        vocab_size=len(vocab) if vocab is not None else int(tensors.tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        num_experts=key("expert_count"),
        num_experts_per_tok=key("expert_used_count"),
        moe_intermediate_size=key("expert_feed_forward_length"),
        intermediate_size=key("feed_forward_length", 0),
        norm_topk_prob=True,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors.tensors,
        max_position_embeddings=key("context_length"),
        bos_token_id=tensors.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def read_gguf_tokenizer(tensors: GGUFTensors) -> Tokenizer | None:
    """The tokenizer and chat template in the file's metadata; None when it has no vocabulary."""
    model = tensors.field("tokenizer.ggml.model")
    if model is None:
        return None
    pre = tensors.field("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "qwen2":
        raise CheckpointError(
            f"{tensors.path} has tokenizer model {model!r} with pre-tokenizer {pre!r}; "
            "Qwen3 uses 'gpt2' (byte-level BPE) with 'qwen2'"
        )
    vocab = GGUFVocab(
        tokens=tensors.field("tokenizer.ggml.tokens"),
        token_types=tensors.field("tokenizer.ggml.token_type"),
        merges=tensors.field("tokenizer.ggml.merges", []),
    )

    def token(key: str) -> str | None:
        i = tensors.field(key)
        return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

    return Tokenizer.from_gguf_vocab(
        vocab,
        chat_template=tensors.field("tokenizer.chat_template"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
    )


def check_gguf_expressible(config: ModelConfig) -> None:
    """llama.cpp's qwen3moe cannot run dense layers or un-renormalised top-k; refuse rather than mislead."""
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
    when given, as a qwen3moe GGUF file.

    Matrices are stored in `qtype`; norm vectors stay F32 as llama.cpp's converter keeps them. A matrix
    whose rows do not divide into the type's blocks is stored F32.
    """
    if qtype not in WRITABLE_TYPES:
        raise ConfigError(f"GGUF type {qtype!r} is not writable; choose one of {', '.join(WRITABLE_TYPES)}")
    check_gguf_expressible(config)
    target = WRITABLE_TYPES[qtype]
    block = quants.GGML_QUANT_SIZES[target][0]
    writer = GGUFWriter(str(path), ARCH)
    c = config
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_file_type(FILE_TYPES[qtype])
    if tokenizer is not None:
        _add_tokenizer(writer, config, tokenizer)
    for name, array in named_arrays.items():
        data = np.ascontiguousarray(to_gguf_layout(name, np.asarray(array, np.float32)))
        if data.ndim == 1 or target == Q.F32 or data.shape[-1] % block:
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), quants.quantize(data, target), raw_dtype=target)
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


def int4_from_gguf(tensor: QuantizedTensor, name: str, shape: tuple[int, ...], axis: int) -> QuantizedWeight:
    """A Q4_0 / Q4_K tensor as an int4 weight in our layout (param `name` of float shape `shape`, groups along
    `axis`), its numbers kept: the blocks are taken apart along GGUF's rows, then every array is laid out as
    from_gguf_layout lays out the float tensor, with the group axis at its packed and its grouped length."""
    try:
        weight = int4_from_gguf_blocks(tensor.blocks, tensor.qtype, -1)
    except CheckpointError as err:
        raise CheckpointError(f"tensor {tensor.name!r}: {err}") from None

    def ours(array: np.ndarray, per: int) -> np.ndarray:
        part = list(shape)
        part[axis] //= per
        return np.ascontiguousarray(from_gguf_layout(name, array, tuple(part)))

    offset = None if weight.offset is None else ours(weight.offset, GROUP)
    return QuantizedWeight(ours(weight.values, 2), ours(weight.scale, GROUP), offset)
