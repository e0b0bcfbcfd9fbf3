"""Hugging Face checkpoint directories: config.json + model.safetensors (single or sharded by an index).

Tensors are read one at a time from memory-mapped files, converted to our layout and dtype, and put on
the device before the next is read, so host memory stays near one (stacked) tensor whatever the
checkpoint size. Two expert layouts are read: the published per-expert names
(`mlp.experts.{j}.gate_proj.weight`, which transformers 5's save_pretrained still writes) and the
fused 3-D form transformers 5 uses in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).
`write_hf` writes the published layout, so transformers can run the same weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3moe_jax.errors import CheckpointError
from qwen3moe_jax.io.materialize import check_layers
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import named_leaves, param_specs

INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class SafetensorsReader:
    """Name -> numpy array over all the safetensors files of a directory, opened lazily (mmap)."""

    def __init__(self, directory: Path, stack: ExitStack):
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"no *.safetensors files in {directory}")
        self._handles = {}
        for name in files:
            path = _weight_file(directory, name)
            try:
                self._handles[name] = stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as err:  # the library raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read {path}: {err}") from err
        if weight_map is None:
            weight_map = {key: name for name, h in self._handles.items() for key in h.keys()}
        self._where = weight_map
        self.directory = directory
        # The loading bar's figures (io.FileReader): the files' tensor data, and the bytes of the tensors read
        # so far as stored, each counted once.
        self.total_bytes = sum(_data_bytes(directory / name) for name in files)
        self.bytes_read = 0
        self._counted: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        array = self._read(name, lambda handle: handle.get_tensor(name))
        if name not in self._counted:
            self._counted.add(name)
            self.bytes_read += array.nbytes
        return array

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file's header, reading no data."""
        return tuple(self._read(name, lambda handle: handle.get_slice(name).get_shape()))

    def _read(self, name: str, read: Callable[[Any], Any]) -> Any:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        try:
            return read(self._handles[self._where[name]])
        except Exception as err:  # absent from the file the index names, or a dtype numpy cannot hold
            raise CheckpointError(f"cannot read tensor {name!r} from {self.directory / self._where[name]}: {err}") \
                from None


def _read_index(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index} is not a readable JSON file: {err}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index} must hold a weight_map object mapping tensor names to file names")
    return weight_map


def _weight_file(directory: Path, name: str) -> Path:
    """A weights file the index (or a listing) names, refused unless it stays inside the checkpoint directory:
    a relative name without '..' whose target, symlinks followed, is a regular file inside the directory, or,
    for a Hugging Face hub snapshot (snapshots/<revision>/, whose files link to ../../blobs/), in its blobs."""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise CheckpointError(f"{directory} names the weights file {name!r}, which is outside the checkpoint")
    path = directory / relative
    if not path.is_file():
        raise CheckpointError(f"{directory} names the weights file {name!r}, which is not a file in it")
    root, target = directory.resolve(), path.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(folder) for folder in allowed):
        raise CheckpointError(f"{path} links to {target}, outside the checkpoint directory")
    return path


def check_hf_tensors(config: ModelConfig, reader: SafetensorsReader) -> None:
    """Before any weight is read: the checkpoint holds every layer the config names and no other, the experts
    it names (per-expert layout) and no other, and each tensor with the shape the config implies (from the
    files' headers)."""
    names = reader.names()
    layers = {int(m[1]) for name in names if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    check_layers(config, layers, reader.directory, "config.json num_hidden_layers")
    experts = {int(m[1]) for name in names if (m := re.match(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.", name))}
    if experts and (max(experts) >= config.num_experts or len(experts) < config.num_experts):
        raise CheckpointError(f"{reader.directory} holds experts numbered up to {max(experts)} ({len(experts)} "
                              f"in all), but config.json num_experts says {config.num_experts}")
    X, E, F = config.num_experts, config.hidden_size, config.moe_intermediate_size
    for name, spec in named_leaves(param_specs(config)).items():
        _, layer, *rest = name.split(".") if name.startswith("layers.") else ("", "", "")  # layers.3.mlp.gate
        fused = _fused_name(f"model.layers.{layer}", rest[-1]) if rest[0] == "mlp" and len(spec.shape) == 3 else None
        if fused in reader:  # [X, E, F] for down_proj, [X, 2F, E] for gate_up_proj
            implied = [(fused, (X, E, F) if rest[-1] == "down" else (X, 2 * F, E))]
        else:  # the published layout, as write_hf writes it, from a stand-in that allocates nothing
            implied = [(n, a.shape) for n, a in hf_tensors(name, np.broadcast_to(np.float32(0), spec.shape), config)]
        for hf_name, shape in implied:
            if reader.shape(hf_name) != shape:
                raise CheckpointError(f"{reader.directory}: tensor {hf_name} has shape {reader.shape(hf_name)}, but "
                                      f"config.json implies {shape}")


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: all but its 8-byte header length and the JSON header."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header_len


def hf_tensor_source(name: str, config: ModelConfig, reader: SafetensorsReader) -> Callable[[Any], np.ndarray]:
    """How to build our param `name` (e.g. 'layers.3.mlp.gate') from the checkpoint, in numpy dtype `dt`.

    HF linear weights are [out, in]; ours are [in, out] with heads as their own axis.
    """
    c = config
    parts = name.split(".")

    def linear(hf_name: str, out_shape: tuple[int, ...]) -> Callable[[Any], np.ndarray]:
        return lambda dt: np.asarray(reader.get(hf_name).T, dtype=dt).reshape(out_shape)

    def plain(hf_name: str) -> Callable[[Any], np.ndarray]:
        return lambda dt: np.asarray(reader.get(hf_name), dtype=dt)

    if name == "embed":
        return plain("model.embed_tokens.weight")
    if name == "final_norm":
        return plain("model.norm.weight")
    if name == "lm_head":
        return linear("lm_head.weight", (c.hidden_size, c.vocab_size))

    i, group, leaf = int(parts[1]), parts[2], parts[-1]
    prefix = f"model.layers.{i}"
    E, H, KV, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    if group == "attn_norm":
        return plain(f"{prefix}.input_layernorm.weight")
    if group == "mlp_norm":
        return plain(f"{prefix}.post_attention_layernorm.weight")
    if group == "attn":
        attn = f"{prefix}.self_attn"
        return {
            "q": linear(f"{attn}.q_proj.weight", (E, H, D)),
            "k": linear(f"{attn}.k_proj.weight", (E, KV, D)),
            "v": linear(f"{attn}.v_proj.weight", (E, KV, D)),
            "o": linear(f"{attn}.o_proj.weight", (H, D, E)),
            "q_norm": plain(f"{attn}.q_norm.weight"),
            "k_norm": plain(f"{attn}.k_norm.weight"),
        }[leaf]
    if not c.is_moe_layer(i):  # dense SwiGLU layer
        F = c.intermediate_size
        return {
            "gate": linear(f"{prefix}.mlp.gate_proj.weight", (E, F)),
            "up": linear(f"{prefix}.mlp.up_proj.weight", (E, F)),
            "down": linear(f"{prefix}.mlp.down_proj.weight", (F, E)),
        }[leaf]
    if leaf == "router":
        return linear(f"{prefix}.mlp.gate.weight", (E, c.num_experts))
    return _expert_source(prefix, leaf, config, reader)


def _expert_source(prefix: str, leaf: str, c: ModelConfig, reader: SafetensorsReader) -> Callable[[Any], np.ndarray]:
    X, F, E = c.num_experts, c.moe_intermediate_size, c.hidden_size
    fused = _fused_name(prefix, leaf)
    if fused in reader:
        if leaf == "down":  # [X, E, F] -> [X, F, E]
            return lambda dt: np.asarray(reader.get(fused).transpose(0, 2, 1), dtype=dt)
        half = slice(0, F) if leaf == "gate" else slice(F, 2 * F)  # gate_up_proj: [X, 2F, E]
        return lambda dt: np.asarray(reader.get(fused)[:, half].transpose(0, 2, 1), dtype=dt)

    hf_leaf = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[leaf]
    shape = (X, F, E) if leaf == "down" else (X, E, F)

    def stacked(dt: Any) -> np.ndarray:
        # Filled expert by expert so at most one expert's source tensor is held beside the result.
        out = np.empty(shape, dtype=dt)
        for j in range(X):
            out[j] = reader.get(f"{prefix}.mlp.experts.{j}.{hf_leaf}.weight").T
        return out

    return stacked


def _fused_name(prefix: str, leaf: str) -> str:
    """The fused tensor (transformers 5's in-memory layout) that holds expert param `leaf` of a layer."""
    return f"{prefix}.mlp.experts.down_proj" if leaf == "down" else f"{prefix}.mlp.experts.gate_up_proj"


def read_hf_config(directory: Path) -> ModelConfig:
    return ModelConfig.from_json_file(directory / "config.json")


def read_hf_tokenizer(directory: Path) -> Tokenizer | None:
    """tokenizer.json with the chat template (chat_template.jinja, or tokenizer_config.json's
    `chat_template`) and the bos/eos token strings; None when the directory has no tokenizer.json."""
    if not (directory / "tokenizer.json").is_file():
        return None
    config_file, template_file = directory / "tokenizer_config.json", directory / "chat_template.jinja"
    config = _read(config_file, json.loads) if config_file.is_file() else {}
    template = _read(template_file, str) if template_file.is_file() else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)

    def token(key: str) -> str | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{config_file}: {key} must be a string, got {value!r}")
        return value

    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
    return Tokenizer.from_file(directory / "tokenizer.json", chat_template=template,
                               bos_token=token("bos_token"), eos_token=token("eos_token"))


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def write_hf(directory: str | Path, config: ModelConfig, named_arrays: dict[str, np.ndarray],
             tokenizer: Tokenizer | None = None) -> None:
    """Write params (our names -> numpy arrays in our layout) as a Hugging Face checkpoint directory:
    config.json, model.safetensors with the published Qwen3-MoE names, and the tokenizer when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    tensors: dict[str, np.ndarray] = {}
    for name, array in named_arrays.items():
        for hf_name, value in hf_tensors(name, np.asarray(array), config):
            tensors[hf_name] = np.ascontiguousarray(value)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.backend.save(str(directory / "tokenizer.json"))
        settings = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                    "chat_template": tokenizer.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def hf_tensors(name: str, array: np.ndarray, c: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """Our param -> its (published HF name, HF array) pairs: the inverse of hf_tensor_source. The arrays may
    be views of `array` (transposes), so each costs no copy until it is written."""
    top = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
           "lm_head": ("lm_head.weight", True)}
    if name in top:
        hf_name, linear = top[name]
        return [(hf_name, array.T if linear else array)]
    _, i, *rest = name.split(".")
    prefix = f"model.layers.{i}"
    leaf = ".".join(rest)
    plain = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
    if leaf in plain:
        return [(f"{prefix}.{plain[leaf]}.weight", array)]
    if leaf == "attn.o":  # [H, D, E] -> [E, H*D]
        return [(f"{prefix}.self_attn.o_proj.weight", array.reshape(-1, c.hidden_size).T)]
    if leaf in ("attn.q", "attn.k", "attn.v"):  # [E, heads, D] -> [heads*D, E]
        return [(f"{prefix}.self_attn.{leaf[-1]}_proj.weight", array.reshape(c.hidden_size, -1).T)]
    if leaf == "mlp.router":
        return [(f"{prefix}.mlp.gate.weight", array.T)]
    proj = {"mlp.gate": "gate_proj", "mlp.up": "up_proj", "mlp.down": "down_proj"}[leaf]
    if array.ndim == 2:  # a dense layer
        return [(f"{prefix}.mlp.{proj}.weight", array.T)]
    return [(f"{prefix}.mlp.experts.{j}.{proj}.weight", array[j].T) for j in range(array.shape[0])]
