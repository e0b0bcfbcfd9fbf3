"""A checkpoint on disk to (config, params on the device, tokenizer), whatever its format: a GGUF file (llama.cpp
`qwen3moe` or dense `qwen3`, gguf_file.py) or a Hugging Face directory (config.json + *.safetensors, hf.py); and
back, the params as float32 host arrays for the writers."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qwen3moe_jax.errors import CheckpointError
from qwen3moe_jax.io.gguf_file import (
    INT4_TYPES,
    GGUFTensors,
    check_gguf_tensors,
    from_gguf_layout,
    gguf_name,
    int4_from_gguf,
    is_gguf_file,
    read_gguf_config,
    read_gguf_tokenizer,
)
from qwen3moe_jax.io.hf import (
    SafetensorsReader,
    check_hf_tensors,
    hf_tensor_source,
    is_hf_dir,
    read_hf_config,
    read_hf_tokenizer,
)
from qwen3moe_jax.io.materialize import materialize
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params, named_leaves, param_specs
from qwen3moe_jax.model.quant import INT4, QuantizedWeight, dequantize, group_axis, is_int4_groupable, is_quantized


def read_checkpoint(path: Path, dtype: Any, progress: bool, mesh: Mesh | None,
                    moe_kernel: str) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """The checkpoint at `path` read into params of `dtype` (see qwen3moe_jax.load), each tensor placed on its
    shards of `mesh` as it is read, with a loading bar when `progress`."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_gguf_file(path):
        return _read_gguf(path, dtype, progress, mesh, moe_kernel)
    if not is_hf_dir(path):
        raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint directory with a config.json")
    config = read_hf_config(path).replace(moe_kernel=moe_kernel)
    with ExitStack() as stack:
        reader = SafetensorsReader(path, stack)
        check_hf_tensors(config, reader)
        params = materialize(config, lambda name: hf_tensor_source(name, config, reader), reader, dtype, progress,
                             f"loading {path.name}", mesh, path)
    return config, params, read_hf_tokenizer(path)


def _read_gguf(path: Path, dtype: Any, progress: bool, mesh: Mesh | None,
               moe_kernel: str) -> tuple[ModelConfig, Params, Tokenizer | None]:
    tensors = GGUFTensors(path)
    config = read_gguf_config(tensors).replace(moe_kernel=moe_kernel)
    check_gguf_tensors(tensors, config)
    tokenizer = read_gguf_tokenizer(tensors)
    shapes = named_leaves(param_specs(config))

    def source(name: str):
        spec = shapes[name]

        def read(dt: Any) -> np.ndarray | QuantizedWeight:
            raw = tensors.raw(gguf_name(name, config))
            if (dtype == INT4 and raw.qtype in INT4_TYPES and is_quantized(name, spec.axes)
                    and is_int4_groupable(spec.axes, spec.shape)):  # 4-bit blocks go to the device as stored
                return int4_from_gguf(raw, name, spec.shape, group_axis(spec.axes))
            return np.asarray(from_gguf_layout(name, raw.dequantize(), spec.shape), dtype=dt)

        return read

    params = materialize(config, source, tensors, dtype, progress, f"loading {path.name}", mesh, path)
    return config, params, tokenizer


def float32_arrays(params: Params) -> dict[str, np.ndarray]:
    """{param name: float32 host array}; quantized weights are copied to the host as stored and dequantized there,
    so the device never holds a float32 copy."""
    return {
        name: dequantize(jax.device_get(a)) if isinstance(a, QuantizedWeight) else np.asarray(a, np.float32)
        for name, a in named_leaves(params).items()
    }
