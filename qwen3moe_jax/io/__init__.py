"""Checkpoint readers. Each format supplies, per param name, a function building that tensor in numpy;
`materialize` walks the param specs, builds each tensor (quantizing it for int8 and int4) and puts it on the
device before the next."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from qwen3moe_jax.config import ModelConfig
from qwen3moe_jax.errors import CheckpointError
from qwen3moe_jax.model import Params, ParamSpec, param_name, param_specs
from qwen3moe_jax.quant import INT4, QuantizedWeight, host_param
from qwen3moe_jax.sharding import place

# numpy dtype -> array in our layout; a source may hand out an int4 weight as its file stores it instead.
TensorSource = Callable[[Any], np.ndarray | QuantizedWeight]


def materialize(
    config: ModelConfig,
    source_for: Callable[[str], TensorSource],
    dtype: Any,
    progress: bool = True,
    desc: str = "loading",
    mesh: Any = None,
) -> Params:
    """Build the params pytree tensor by tensor, checking each shape against its spec. Each tensor goes to
    the device (or, with a mesh, straight into its shards) before the next is read, so host memory holds
    about one tensor at a time. For int8 and int4 each tensor is read in float32 and quantized on the host
    (quant.host_param) on its way, unless its source hands out int4 as stored (GGUF Q4_0 / Q4_K blocks)."""
    specs = param_specs(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    np_dtype = np.dtype(dtype)
    read_dtype = np.dtype(np.float32) if np_dtype in (np.int8, INT4) else np_dtype
    total = sum(math.prod(spec.shape) for _, spec in flat) * np_dtype.itemsize
    leaves = []
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for path, spec in flat:
            name = param_name(path)
            try:
                array = source_for(name)(read_dtype)
            except ValueError as err:  # numpy reshape/broadcast failures: the file disagrees with the config
                raise CheckpointError(
                    f"tensor for {name} does not fit shape {spec.shape} of the config: {err}"
                ) from None
            if array.shape != spec.shape:
                raise CheckpointError(
                    f"tensor for {name} has shape {array.shape}, but the config implies {spec.shape}"
                )
            leaves.append(place(host_param(name, spec.axes, array, np_dtype), spec.axes, mesh))
            del array
            bar.update(math.prod(spec.shape) * np_dtype.itemsize)
    return jax.tree_util.tree_unflatten(treedef, leaves)
