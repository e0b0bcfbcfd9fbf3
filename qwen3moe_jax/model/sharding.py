"""Weights and KV cache on a device mesh, by JAX's own sharding.

Every param and cache dimension has a logical axis name (params.param_specs, cache.CACHE_AXES); one rules
table maps those names to the mesh axes below. The same jit prefill and decode steps then run on one device
or on many: XLA partitions the attention einsums from the weights' shardings, and the MoE block runs
expert-parallel under `shard_map` (moe.moe), so each device multiplies only the experts it holds.

    data    batch rows of the KV cache and of a step's activations
    expert  which experts a device holds
    tensor  attention heads and FFN width (expert FFN too), i.e. Megatron-style tensor parallelism

A dimension smaller than its mesh axis or not divisible by it (4 kv heads on 8 devices) is replicated
along that axis, not an error. A mesh spans every process's devices after `jax.distributed.initialize`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model.quant import QuantizedWeight

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axis. Names not listed (embed, head_dim, seq, vocab) are replicated: the embedding
# and lm_head tables are read whole by every device, which keeps the sampler's vocabulary ops local.
RULES: dict[str, str] = {
    "batch": "data",
    "experts": "expert",
    "heads": "tensor",
    "kv_heads": "tensor",
    "expert_ffn": "tensor",
    "ffn": "tensor",
}


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, expert, tensor) over the first data*expert*tensor visible devices (under
    multi-host, jax.devices() lists every process's devices, so the mesh spans the hosts)."""
    sizes = (data, expert, tensor)
    if min(sizes) < 1:
        raise ConfigError(f"mesh axis sizes must be >= 1, got data={data} expert={expert} tensor={tensor}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes) > len(devices):
        raise ConfigError(f"a mesh of data={data} x expert={expert} x tensor={tensor} needs {math.prod(sizes)} "
                          f"devices; {len(devices)} are visible")
    # Auto axes: XLA propagates shardings through the einsums (GSPMD); only the MoE block is written per device.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[: math.prod(sizes)])


def parse_mesh(text: str) -> dict[str, int]:
    """'expert=2,tensor=4' -> {'expert': 2, 'tensor': 4} (for the command line)."""
    sizes: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise ConfigError(f"bad mesh {text!r}: expected comma-separated AXIS=N with AXIS in {MESH_AXES}")
        sizes[name.strip()] = int(value)
    return sizes


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape on a mesh of these axis sizes.

    A dimension is split over its rule's mesh axis only if that axis has more than one device and divides
    the dimension; each mesh axis is used once per array.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = RULES.get(name) if name else None
        size = axis_sizes.get(mesh_axis, 1) if mesh_axis else 1
        if mesh_axis and size > 1 and dim % size == 0 and mesh_axis not in used:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, dict(mesh.shape)))


def place(array: Any, axes: Sequence[str | None], mesh: Mesh | None) -> Any:
    """Put a host array (or a pytree of arrays with the same logical axes, like a QuantizedWeight's values,
    scales and offsets) on the device(s): with a mesh, each addressable device receives only its shard, so
    no device ever holds a full copy of a sharded tensor.

    An int4 weight's bytes and its groups' scales must split alike along the group axis, or a device would
    hold bytes whose scales are elsewhere: a mesh axis that divides the one but not the other is refused."""
    if mesh is None:
        return jax.device_put(array)
    if isinstance(array, QuantizedWeight) and array.bits == 4:
        values, scale = (logical_spec(axes, a.shape, dict(mesh.shape)) for a in (array.values, array.scale))
        if values != scale:
            raise ConfigError(f"an int4 weight of axes {tuple(axes)} and shape {array.shape} splits its bytes as "
                              f"{values} but its {array.scale.shape} group scales as {scale}: choose mesh axis "
                              "sizes that divide the number of groups of 32")

    def one(a: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(a.shape, named_sharding(mesh, axes, a.shape), lambda index: a[index])

    return jax.tree.map(one, array)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Host values (numpy or single-device arrays) as arrays replicated over the mesh: a step's small
    inputs (tokens, positions, sampler settings), identical on every process under multi-host. Without a
    mesh, device arrays on the default device, by one device_put of the whole tree: tens of microseconds a
    decode step, where jnp.asarray per value cost ~0.15 ms each (it dispatches a conversion)."""
    if mesh is None:
        return jax.device_put(tree)

    def one(a: Any) -> jax.Array:
        if jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):  # rng keys travel as their bits
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        return place(np.asarray(a), (None,) * np.ndim(a), mesh)

    return jax.tree.map(one, tree)


def zeros(shape: tuple[int, ...], dtype: Any, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """A zero buffer created directly in its shards (the KV cache)."""
    if mesh is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=named_sharding(mesh, axes, shape))()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Inside a step traced under `use_mesh`: pin x to the sharding its logical axes give. Without a mesh
    (one device), x as it is."""
    sizes = mesh_sizes()
    if not sizes:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, sizes))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Run jit steps under the mesh (what `constrain` and the expert-parallel MoE read); no-op without one."""
    if mesh is None:
        yield
    else:
        with jax.set_mesh(mesh):
            yield


def mesh_sizes() -> dict[str, int]:
    """Axis sizes of the mesh a step is being traced under ({} on one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)
