"""Checkpoint readers. Each format supplies, per param name, a function building that tensor in numpy;
`materialize` walks the param specs, builds each tensor (quantizing it for int8 and int4) and puts it on the
device before the next. Each reader counts the bytes it has read from its files (`FileReader`), which is what
the loading bar shows."""

from __future__ import annotations

import math
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from tqdm import tqdm

from qwen3moe_jax.errors import CheckpointError
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params, ParamSpec, param_name, param_specs
from qwen3moe_jax.model.quant import INT4, QuantizedWeight, host_param
from qwen3moe_jax.model.sharding import place

# numpy dtype -> array in our layout; a source may hand out an int4 weight as its file stores it instead.
TensorSource = Callable[[Any], np.ndarray | QuantizedWeight]


class FileReader(Protocol):
    """What the loading bar needs of a checkpoint reader: the bytes of tensor data its files hold, and how many
    of them it has read so far (as stored: a Q8_0 file's bytes, not the float32 they dequantize to)."""

    total_bytes: int
    bytes_read: int


def check_layers(config: ModelConfig, present: Set[int], checkpoint: str | Path, count_key: str) -> None:
    """The layers a checkpoint holds tensors for must be exactly 0..num_layers-1: a count below them would
    drop layers silently, one above them would look for tensors that are not there. Compared against the
    layers present, so an absurd count costs nothing."""
    n = config.num_layers
    if beyond := sorted(i for i in present if i >= n):
        raise CheckpointError(f"{checkpoint} holds tensors of layer {beyond[0]}, but its {count_key} says {n} "
                              f"layers ({len(beyond)} layers beyond it)")
    if len(present) < n:
        missing = next(i for i in range(n) if i not in present)  # found within len(present) + 1 steps
        raise CheckpointError(f"{checkpoint} has no tensors for layer {missing}, but its {count_key} says {n} "
                              f"layers ({len(present)} present)")


def materialize(
    config: ModelConfig,
    source_for: Callable[[str], TensorSource],
    reader: FileReader,
    dtype: Any,
    progress: bool = True,
    desc: str = "loading",
    mesh: Any = None,
    checkpoint: str | Path = "the checkpoint",
) -> Params:
    """Build the params pytree tensor by tensor, checking each shape against its spec. Each tensor goes to
    the device (or, with a mesh, straight into its shards) before the next is read, so host memory holds
    about one tensor at a time. For int8 and int4 each tensor is read in float32 and quantized on the host
    (quant.host_param) on its way, unless its source hands out int4 as stored (GGUF Q4_0 / Q4_K blocks). A tensor
    holding NaN or infinity is refused by name (`checkpoint` names the file in errors)."""
    specs = param_specs(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    np_dtype = np.dtype(dtype)
    read_dtype = np.dtype(np.float32) if np_dtype in (np.int8, INT4) else np_dtype
    leaves = []
    with tqdm(total=reader.total_bytes, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for path, spec in flat:
            name = param_name(path)
            try:
                array = source_for(name)(read_dtype)
            except ValueError as err:  # numpy reshape/broadcast failures: the file disagrees with the config
                raise CheckpointError(
                    f"{checkpoint}: tensor for {name} does not fit shape {spec.shape} of the config: {err}"
                ) from None
            if array.shape != spec.shape:
                raise CheckpointError(
                    f"{checkpoint}: tensor for {name} has shape {array.shape}, but the config implies {spec.shape}"
                )
            if not _all_finite(array):
                raise CheckpointError(f"{checkpoint}: the weights of {name} hold NaN or infinite values")
            leaves.append(place(host_param(name, spec.axes, array, np_dtype), spec.axes, mesh))
            del array
            bar.update(reader.bytes_read - bar.n)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _all_finite(array: np.ndarray | QuantizedWeight) -> bool:
    """No NaN or infinity in a tensor (for int4 kept as stored, in its scales and offsets). min and max pass
    over the values without allocating, and either is NaN or inf when one value is."""
    parts = [array.scale, array.offset] if isinstance(array, QuantizedWeight) else [array]
    return all(
        a.size == 0 or (math.isfinite(float(a.min())) and math.isfinite(float(a.max())))
        for a in parts if a is not None
    )
