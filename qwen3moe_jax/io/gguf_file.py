"""GGUF files of llama.cpp's `qwen3moe` architecture, and of its dense `qwen3` (a draft model's), read:
memory-mapped, dequantized tensor by tensor with the `gguf` package, config, tokenizer and chat template from the
metadata (gguf_write.py writes them).

llama.cpp's qwen3moe graph always renormalises the top-k router weights and has no dense MLP layers, so
a qwen3moe file means norm_topk_prob=True and every layer MoE; a qwen3 file, every layer dense.
GGUF numpy shapes are ggml's `ne` reversed, which makes every linear weight [out, in] (as in HF files).
"""

from __future__ import annotations

import math
import mmap
import numbers
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, quants

from qwen3moe_jax.errors import CheckpointError, ConfigError
from qwen3moe_jax.io.materialize import check_layers
from qwen3moe_jax.io.tokenizer import GGUFVocab, Tokenizer
from qwen3moe_jax.model.config import ModelConfig, Yarn
from qwen3moe_jax.model.params import named_leaves, param_specs
from qwen3moe_jax.model.quant import GROUP, QuantizedWeight, int4_from_gguf_blocks

ARCH = "qwen3moe"
DENSE_ARCH = "qwen3"  # llama.cpp's dense Qwen3 (Qwen3ForCausalLM): the same tensors, a dense MLP in every layer
Q = GGMLQuantizationType
READABLE_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
INT4_TYPES = {Q.Q4_0, Q.Q4_K}  # 4-bit types whose blocks dtype="int4" keeps as stored (quant.int4_from_gguf_blocks)
# Limits of what this loader reads, far above any qwen3moe file (3 arrays of about 152k tokens and merges,
# 3 + 14 tensors a layer), so that even a consistent but hostile file costs bounded time and memory (each
# array element read becomes a Python object: about 36 to 80 bytes).
MAX_METADATA_ELEMENTS = 1 << 22  # over all metadata arrays together
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
GGML_MAX_DIMS = 4
_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.BOOL: "?", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
# Our config fields -> the metadata keys they are read from ("{arch}": the file's architecture), to name the key
# when a value is refused.
CONFIG_KEYS = {
    "hidden_size": "{arch}.embedding_length", "num_layers": "{arch}.block_count",
    "num_heads": "{arch}.attention.head_count", "num_kv_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length", "num_experts": "{arch}.expert_count",
    "num_experts_per_tok": "{arch}.expert_used_count", "moe_intermediate_size": "{arch}.expert_feed_forward_length",
    "intermediate_size": "{arch}.feed_forward_length", "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base", "max_position_embeddings": "{arch}.context_length",
    "vocab_size": "tokenizer.ggml.tokens", "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_ids": "tokenizer.ggml.eos_token_id",
}
_REQUIRED = object()


def _integer(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# Metadata value kinds -> their test; field(kind=...) refuses a value of another kind by its key.
_KINDS: dict[str, Callable[[Any], bool]] = {
    "an integer": _integer,
    "a number": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(_integer(x) for x in v),
}


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_name(name: str, config: ModelConfig | None = None) -> str:
    """Our param name -> the GGUF tensor name (llama.cpp's names, kept as they are). A dense layer's MLP (`config`
    says which layers are dense; without one, every layer is MoE) is ffn_gate / ffn_up / ffn_down."""
    top = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    if name in top:
        return top[name]
    _, layer, *rest = name.split(".")
    if config is not None and not config.is_moe_layer(int(layer)) and rest[0] == "mlp":
        return f"blk.{layer}.ffn_{rest[-1]}.weight"
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


class GGUFTensor(NamedTuple):
    """One entry of a GGUF file's tensor table; `shape` is ggml's `ne` (innermost first), `data` the
    memory-mapped bytes in GGUF's numpy layout (for block types, uint8 rows of blocks along the last axis)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    data: np.ndarray


class GGUFTensors:
    """The metadata and tensors of a memory-mapped GGUF file, tensors read raw or dequantized on request.

    The file is parsed here, not by gguf.GGUFReader: that reader builds numpy objects for every element of
    every metadata array before checking counts against the file (17 s and 500 MB for Qwen's 152k-token
    vocabulary on our CI machine; minutes and gigabytes for a corrupt count). This parse checks every count and
    length against the bytes left before using it, reads arrays whole with numpy, and refuses a file whose
    tensors do not lie back to back with exactly the bytes their types and shapes need (as llama.cpp
    requires), which catches a tensor relabelled to another type. The gguf package still supplies the format's
    constants, the block codecs and the writer."""

    def __init__(self, path: Path):
        self.path = path
        self.fields, table, data_start = _parse(path)
        data = np.memmap(path, mode="r")
        self.tensors = {}
        for name, dims, qtype, offset, nbytes in table:
            np_shape = tuple(reversed(dims))
            itemtype = _ITEM_TYPES.get(qtype)
            if itemtype is None:  # block types: bytes, rows of blocks
                itemtype, np_shape = np.uint8, quants.quant_shape_to_byte_shape(np_shape, qtype)
            start = data_start + offset
            array = data[start:start + nbytes].view(itemtype).reshape(np_shape)
            self.tensors[name] = GGUFTensor(name, qtype, np.array(dims, np.uint64), math.prod(dims), array)
        # The loading bar's figures (io.FileReader): bytes as stored, each tensor counted once.
        self.total_bytes = sum(int(t.data.nbytes) for t in self.tensors.values())
        self.bytes_read = 0
        self._counted: set[str] = set()

    def field(self, key: str, default: Any = None, kind: str | None = None) -> Any:
        """A metadata value (default when absent); with `kind` (a key of _KINDS), refused unless of that kind."""
        value = self.fields.get(key, default)
        if key in self.fields and kind is not None and not _KINDS[kind](value):
            shown = repr(value) if not isinstance(value, list) else f"a list of {len(value)} values"
            raise CheckpointError(f"{self.path}: metadata {key} must be {kind}, got {shown[:80]}")
        return value

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
        if gguf_tensor not in self._counted:
            self._counted.add(gguf_tensor)
            self.bytes_read += int(tensor.data.nbytes)
        return QuantizedTensor(gguf_tensor, tensor.tensor_type, tensor.data)


_ITEM_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
               Q.I32: np.int32, Q.I64: np.int64}


class _Cursor:
    """Reads a GGUF header front to back, every length checked against the bytes left before it is used."""

    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.pos = data, path, 0
        self.elements = 0  # metadata array elements so far

    def take(self, size: int, what: str) -> int:
        """Skip `size` bytes holding `what`; the offset they start at."""
        if size > len(self.data) - self.pos:
            raise CheckpointError(f"{self.path}: {what} needs {size} bytes at offset {self.pos}, but the file has "
                                  f"{len(self.data) - self.pos} left (truncated, or a corrupt count or length)")
        self.pos += size
        return self.pos - size

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def text(self, what: str) -> str:
        size = self.unpack("<Q", f"the length of {what}")
        start = self.take(size, what)
        try:
            return self.data[start:start + size].decode()
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 text ({err})") from None

    def value(self, kind: int, key: str) -> Any:
        if kind == GGUFValueType.STRING:
            return self.text(f"metadata {key}")
        if kind == GGUFValueType.ARRAY:
            kind, count = self.unpack("<I", f"the element type of {key}"), self.unpack("<Q", f"the length of {key}")
            self.elements += count
            if self.elements > MAX_METADATA_ELEMENTS:
                raise CheckpointError(f"{self.path}: metadata {key} claims {count} elements, which brings the "
                                      f"metadata arrays past the {MAX_METADATA_ELEMENTS} elements this loader reads")
            if kind == GGUFValueType.STRING:
                if count * 8 > len(self.data) - self.pos:  # each string has an 8-byte length at least
                    self.take(count * 8, f"the {count} strings of metadata {key}")
                return [self.text(f"metadata {key}[{i}]") for i in range(count)]
            if kind in _SCALARS:
                dtype = np.dtype(_SCALARS[GGUFValueType(kind)])
                start = self.take(dtype.itemsize * count, f"metadata {key}")
                return np.frombuffer(self.data, dtype, count, start).tolist()
        elif kind in _SCALARS:
            dtype = np.dtype(_SCALARS[GGUFValueType(kind)])
            return np.frombuffer(self.data, dtype, 1, self.take(dtype.itemsize, f"metadata {key}")).tolist()[0]
        nested = " (arrays of arrays are not read)" if kind == GGUFValueType.ARRAY else ""
        raise CheckpointError(f"{self.path}: metadata {key} has an unknown value type {kind}{nested}")


def _parse(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]], int]:
    """The metadata, the tensor table (name, ggml dims, type, offset in the data section, bytes) and where the
    data section starts; see GGUFTensors for what is checked."""
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path} is {size} bytes long, too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        c = _Cursor(data, path)
        if data[:4] != b"GGUF":
            raise CheckpointError(f"{path} does not start with the GGUF magic")
        c.take(4, "the magic")
        version = c.unpack("<I", "the version")
        if version not in (2, 3):
            kind = "a big-endian file, which" if version & 0xFFFF == 0 else f"GGUF version {version}, which"
            raise CheckpointError(f"{path} is {kind} this loader does not read (little-endian versions 2 and 3)")
        n_tensors, n_keys = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the metadata count")
        if n_tensors > MAX_TENSORS or n_keys > MAX_METADATA_KEYS:
            raise CheckpointError(f"{path} claims {n_tensors} tensors and {n_keys} metadata keys; this loader reads "
                                  f"at most {MAX_TENSORS} and {MAX_METADATA_KEYS}")
        fields: dict[str, Any] = {}
        for i in range(n_keys):
            key = c.text(f"metadata key #{i}")
            if key in fields:
                raise CheckpointError(f"{path}: metadata {key} appears twice")
            fields[key] = c.value(c.unpack("<I", f"the type of metadata {key}"), key)
        alignment = fields.get("general.alignment", 32)
        if not _integer(alignment) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: general.alignment must be a power of two, got {alignment!r}")

        table, names = [], set()
        for i in range(n_tensors):
            name = c.text(f"the name of tensor #{i}")
            if name in names:
                raise CheckpointError(f"{path}: tensor {name} appears twice")
            names.add(name)
            n_dims = c.unpack("<I", f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise CheckpointError(f"{path}: tensor {name} claims {n_dims} dimensions (1 to {GGML_MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}Q", data, c.take(8 * n_dims, f"the shape of tensor {name}"))
            raw_type = c.unpack("<I", f"the type of tensor {name}")
            offset = c.unpack("<Q", f"the data offset of tensor {name}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, block_bytes = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"{path}: tensor {name} has unknown type {raw_type}") from None
            if dims[0] % block:
                raise CheckpointError(f"{path}: tensor {name} has rows of {dims[0]} values, not a whole number of "
                                      f"{qtype.name} blocks of {block}")
            table.append((name, dims, qtype, offset, math.prod(dims) // block * block_bytes))
        data_start = -c.pos % alignment + c.pos

    end, before = 0, None
    for entry in table:
        name, _, qtype, offset, nbytes = entry
        if offset != -end % alignment + end:
            culprit = f"{name} ({qtype.name}) starts at data offset {offset}" if before is None else (
                f"{before[0]} ({before[2].name}) needs {before[4]} bytes by its type and shape, but the next "
                f"tensor, {name}, starts {offset - before[3]} bytes after it")
            raise CheckpointError(f"{path}: tensor {culprit}: a tensor's type or shape does not match the bytes "
                                  "it was written with, or the file is corrupt")
        end, before = offset + nbytes, entry
    if data_start + end > size:
        raise CheckpointError(f"{path} is {size} bytes long, but its tensors need {data_start + end} "
                              "(truncated, or a tensor's type or shape is wrong)")
    if table and size - data_start - end >= alignment:
        raise CheckpointError(f"{path} has {size - data_start - end} bytes after its last tensor {table[-1][0]}: "
                              f"that tensor's type ({table[-1][2].name}) or shape does not match the bytes it was "
                              "written with")
    return fields, table, data_start


def read_gguf_config(tensors: GGUFTensors) -> ModelConfig:
    """The model shape from the metadata, each key of the kind it must be, the relations between them
    checked by ModelConfig (errors name the key)."""
    arch = tensors.field("general.architecture", kind="a string")
    if arch not in (ARCH, DENSE_ARCH):
        raise ConfigError(f"{tensors.path} has architecture {arch!r}; this package runs {ARCH!r} (and dense "
                          f"{DENSE_ARCH!r})")
    dense = arch == DENSE_ARCH

    def key(name: str, default: Any = _REQUIRED, kind: str = "an integer") -> Any:
        value = tensors.field(f"{arch}.{name}", default, kind)
        if value is _REQUIRED:
            raise CheckpointError(f"{tensors.path} lacks the metadata key {arch}.{name}")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads if heads > 0 else 0)
    if key("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{tensors.path}: {arch}.attention.value_length differs from key_length ({head_dim}); "
                          f"{arch} attention has one head size")
    if not dense and key("expert_count") < 1:
        raise ConfigError(f"{tensors.path}: {ARCH}.expert_count must be positive: every qwen3moe layer has experts")
    eos = tensors.field("tokenizer.ggml.eos_token_id", kind="an integer")
    vocab = tensors.field("tokenizer.ggml.tokens", kind="a list of strings")
    if vocab is None and "token_embd.weight" not in tensors.tensors:
        raise CheckpointError(f"{tensors.path} has neither a vocabulary nor token_embd.weight")
    try:
        return ModelConfig(
            vocab_size=len(vocab) if vocab is not None else int(tensors.tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            num_layers=key("block_count"),
            num_heads=heads,
            num_kv_heads=key("attention.head_count_kv", heads),
            head_dim=head_dim,
            num_experts=0 if dense else key("expert_count"),
            num_experts_per_tok=1 if dense else key("expert_used_count"),
            moe_intermediate_size=0 if dense else key("expert_feed_forward_length"),
            intermediate_size=key("feed_forward_length") if dense else key("feed_forward_length", 0),
            norm_topk_prob=True,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", kind="a number")),
            rope_theta=float(key("rope.freq_base", 10000.0, "a number")),
            tie_word_embeddings="output.weight" not in tensors.tensors,
            max_position_embeddings=key("context_length"),
            rope_scaling=read_gguf_rope_scaling(tensors),
            bos_token_id=tensors.field("tokenizer.ggml.bos_token_id", kind="an integer"),
            eos_token_ids=() if eos is None else (eos,),
        )
    except ConfigError as err:
        where = f" (metadata {CONFIG_KEYS[err.field].format(arch=arch)})" if err.field in CONFIG_KEYS else ""
        raise ConfigError(f"{tensors.path}: {err}{where}", err.field) from None


# llama.cpp's rope.scaling.* keys (gguf.Keys.Rope) that would change the rotary if set, with their neutral values.
_ROPE_NEUTRAL = {"yarn_ext_factor": 1.0, "yarn_log_multiplier": 0.0}


def read_gguf_rope_scaling(tensors: GGUFTensors) -> Yarn | None:
    """The rope scaling of llama.cpp's `rope.scaling.*` keys: None without a type (or "none"), a Yarn for "yarn"
    (attention_factor = the file's attn_factor times YaRN's own, as llama.cpp's rope multiplies them), and a
    ConfigError naming any other type or a key this model would run differently."""
    def key(name: str, default: Any = None, kind: str = "a number") -> Any:
        return tensors.field(f"{ARCH}.rope.scaling.{name}", default, kind)

    rope_type = key("type", "none", "a string")
    if rope_type == "none":
        return None
    if rope_type != "yarn":
        raise ConfigError(f"{tensors.path}: {ARCH}.rope.scaling.type {rope_type!r} is not supported; only yarn is",
                          "rope_type")
    for name, neutral in _ROPE_NEUTRAL.items():
        if key(name, neutral) != neutral:
            raise ConfigError(f"{tensors.path}: {ARCH}.rope.scaling.{name} = {key(name)} is not supported "
                              f"(only {neutral})", name)
    original = key("original_context_length", kind="an integer")
    if original is None or key("factor") is None:
        raise ConfigError(f"{tensors.path}: yarn rope scaling needs {ARCH}.rope.scaling.factor and "
                          "original_context_length", "rope_scaling")
    try:
        yarn = Yarn(float(key("factor")), original, float(key("yarn_beta_fast", 32.0)),
                    float(key("yarn_beta_slow", 1.0)))
        if (attn_factor := key("attn_factor")) is None:
            return yarn
        return Yarn(yarn.factor, original, yarn.beta_fast, yarn.beta_slow, float(attn_factor) * yarn.mscale)
    except ConfigError as err:
        raise ConfigError(f"{tensors.path}: {ARCH}.rope.scaling: {err}", err.field) from None


def check_gguf_tensors(tensors: GGUFTensors, config: ModelConfig) -> None:
    """Before any weight is read: the file holds exactly the tensors the metadata implies (every layer's, no
    other layers, nothing else), each of the shape the metadata implies and of a type this loader reads."""
    layers = {int(m[1]) for name in tensors.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    arch = ARCH if config.num_experts else DENSE_ARCH
    check_layers(config, layers, tensors.path, f"metadata {CONFIG_KEYS['num_layers'].format(arch=arch)}")
    expected = set()
    for name, spec in named_leaves(param_specs(config)).items():
        gguf_tensor = gguf_name(name, config)
        expected.add(gguf_tensor)
        tensor = tensors.raw(gguf_tensor)  # refuses missing tensors and unread types
        shape = tuple(reversed(tensors.tensors[gguf_tensor].shape.tolist()))
        implied = to_gguf_layout(name, np.broadcast_to(np.float32(0), spec.shape)).shape  # allocates nothing
        if shape != implied:
            raise CheckpointError(f"{tensors.path}: tensor {gguf_tensor} ({tensor.qtype.name}) has shape {shape}, "
                                  f"but the metadata implies {implied}")
    if extra := sorted(set(tensors.tensors) - expected):
        raise CheckpointError(f"{tensors.path} holds tensors a {arch} model of its metadata does not have: "
                              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def read_gguf_tokenizer(tensors: GGUFTensors) -> Tokenizer | None:
    """The tokenizer and chat template in the file's metadata; None when it has no vocabulary."""
    model = tensors.field("tokenizer.ggml.model", kind="a string")
    if model is None:
        return None
    pre = tensors.field("tokenizer.ggml.pre", kind="a string")
    if model != "gpt2" or pre != "qwen2":
        raise CheckpointError(
            f"{tensors.path} has tokenizer model {model!r} with pre-tokenizer {pre!r}; "
            "Qwen3 uses 'gpt2' (byte-level BPE) with 'qwen2'"
        )
    tokens = tensors.field("tokenizer.ggml.tokens", kind="a list of strings")
    if tokens is None:
        raise CheckpointError(f"{tensors.path} names a tokenizer but lacks tokenizer.ggml.tokens")
    vocab = GGUFVocab(
        tokens=tokens,
        token_types=tensors.field("tokenizer.ggml.token_type", [1] * len(tokens), kind="a list of integers"),
        merges=tensors.field("tokenizer.ggml.merges", [], kind="a list of strings"),
    )

    def token(key: str) -> str | None:
        i = tensors.field(key, kind="an integer")
        return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

    try:
        return Tokenizer.from_gguf_vocab(
            vocab,
            chat_template=tensors.field("tokenizer.chat_template", kind="a string"),
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
        )
    except CheckpointError as err:
        raise CheckpointError(f"{tensors.path}: {err}") from None


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
