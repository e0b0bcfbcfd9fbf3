"""`qwen3moe-jax aot`: the serving programs compiled for a GPU that is not here (XLA's deviceless ahead-of-time
compilation), with what XLA says of them: their memory, whether they fit, whether an MoE kernel builds a tensor over
all experts, whether int8/int4 expert weights are dequantized into buffers of their own, and an HBM-bound estimate of
decode speed.

How: the `aot` extra's plugin wheels (jax-cuda12-plugin, jax-cuda12-pjrt, at the installed jax's version) give
compile-only CUDA devices from a target description (gpu_targets/*.txtpb, a stream_executor GpuTargetConfigProto).
An Engine on such a device holds abstract params and cache (runtime/engine.py: nothing is allocated), and traces
exactly the prefill-chunk and decode-block programs its warm-up would compile (Engine.warmup_programs), for the target
platform (model/backend.py: the MoE kernel "auto" picks is the GPU's). `compile()` then runs XLA:GPU to PTX.
Without a device there is no autotuning, so GEMM tiles may differ from an on-device compile; buffer sizes are XLA's.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model import backend
from qwen3moe_jax.model.cache import bytes_per_token
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.moe import choose_moe_kernel
from qwen3moe_jax.model.params import abstract_params, named_leaves, param_specs
from qwen3moe_jax.runtime.engine import Engine

TARGETS_DIR = Path(__file__).with_name("gpu_targets")
TARGETS = tuple(sorted(p.stem for p in TARGETS_DIR.glob("*.txtpb")))
AOT_DTYPES = ("bfloat16", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    device: Any  # a compile-only jax.Device
    memory_bytes: int
    bandwidth_bytes_per_s: float
    description: str


def target(name: str) -> Target:
    """The compile-only device of a target in gpu_targets/ (ConfigError if the aot extra is not installed)."""
    path = TARGETS_DIR / f"{name}.txtpb"
    if not path.exists():
        raise ConfigError(f"unknown target {name!r}: one of {', '.join(TARGETS)}")
    text = path.read_text()
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
    except Exception as err:  # noqa: BLE001 - the plugin is missing, or too old or new for this jax
        raise ConfigError(f"cannot compile for a CUDA device here ({type(err).__name__}: {err}); install the aot "
                          "extra, the CUDA plugin at this jax's version: pip install 'qwen3moe-jax[aot]'") from err

    def field(key: str) -> float:
        return float(re.search(rf"\b{key}: ([\d.e+]+)", text)[1])

    return Target(name, topology.devices[0], int(field("device_memory_size")), field("memory_bandwidth"),
                  re.search(r'device_description_str: "([^"]+)"', text)[1])


@dataclasses.dataclass
class Program:
    """One compiled program and what XLA says of it (bytes as XLA's memory analysis gives them)."""

    name: str  # "prefill" or "decode"
    what: str  # e.g. "prefill chunk 128 (window 4096)"
    batch: int  # the KV-cache rows it serves
    tokens: int  # through the model in one step: a prefill chunk's (one row), or one per row for decode
    window: int
    moe_kernel: str  # what "auto" (or the kernel asked for) chose at this program's pairs
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (the cache)
    temp_bytes: int
    fits: bool
    compile_s: float
    dense_expert_tensors: list[str]
    dequant_materialized: bool | None  # None for float weights
    dequant_buffers: list[str]
    custom_calls: list[str]

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compile_programs(config: ModelConfig, dtype: str, batches: list[int], context: int, gpu: Target,
                     prefill_chunk: int, decode_steps: int, warmup_tokens: int | None = None, largest: bool = False,
                     progress: Callable[[str], None] = lambda _: None, kv_dtype: str = "model") -> list[Program]:
    """Every program a server with these settings compiles at warm-up (prompts up to warmup_tokens, default the
    whole context), for each batch size, compiled for `gpu`; with `largest`, only the prefill chunk and the decode
    block of the widest attention window (the full chunk), the two whose memory decides whether the server fits."""
    if dtype not in AOT_DTYPES:
        raise ConfigError(f"aot compiles {', '.join(AOT_DTYPES)} models, not {dtype!r}")
    params = abstract_params(config, dtype, jax.sharding.SingleDeviceSharding(gpu.device))
    programs = []
    for batch in batches:
        engine = Engine(params, config, context, batch, prefill_chunk=prefill_chunk, decode_steps=decode_steps,
                        device=gpu.device, kv_dtype=kv_dtype)
        plan = engine.warmup_programs(warmup_tokens or context, None, all_buckets=True)
        if largest:
            plan = [max((p for p in plan if p[1] == op), key=lambda p: _window_and_tokens(engine, p[1], p[2]))
                    for op in ("prefill", "decode")]
        for i, (what, op, kwargs) in enumerate(plan, 1):
            progress(f"batch {batch}, {i}/{len(plan)}: compiling {what} for {gpu.name}")
            start = time.perf_counter()
            compiled = engine.trace(op, **kwargs).lower().compile()
            compile_s = time.perf_counter() - start
            window, per_row = _window_and_tokens(engine, op, kwargs)
            tokens = per_row if op == "prefill" else batch  # one row's chunk, or one token of every row a step
            with backend.tracing_for(gpu.device.platform):
                kernel = choose_moe_kernel(config.moe_kernel, tokens * config.num_experts_per_tok,
                                           config.num_experts, next(layer.mlp.gate for layer in params.layers
                                                                    if hasattr(layer.mlp, "router")))
            memory = compiled.memory_analysis()
            hlo = compiled.as_text()
            dequant = None if dtype == "bfloat16" else dequantized_buffers(hlo, config)
            program = Program(
                op, what, batch, tokens, window, kernel,
                memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                memory.temp_size_in_bytes, False, round(compile_s, 2), dense_expert_tensors(hlo, config, tokens),
                None if dequant is None else bool(dequant), dequant or [], custom_calls(hlo))
            program.fits = program.peak_bytes <= gpu.memory_bytes
            programs.append(program)
    return programs


def _window_and_tokens(engine: Engine, op: str, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(attention window, tokens per row) of a warm-up program."""
    if op == "decode":
        return kwargs["window"], engine.decode_steps
    tokens, window = engine.chunk_shape(kwargs["start"], kwargs["length"] - kwargs["start"])
    return window, tokens


# ------------------------------------------------------------------------------------------- reading the HLO

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(?:, |$)")
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")


# Ops whose results are their operands' buffers (a loop's state, a tuple, a free reshape), not new memory.
_NO_NEW_BUFFER = ("parameter", "get-tuple-element", "bitcast", "tuple", "while", "call", "conditional")


@dataclasses.dataclass(frozen=True)
class _Buffer:
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each array it makes (a fusion: several)
    opcode: str
    operands: tuple[str, ...]
    matmul: bool  # a GEMM fusion or a kernel's custom call: it writes a product, whatever it reads


def _buffers(hlo: str) -> tuple[list[_Buffer], dict[str, tuple[tuple[str, tuple[int, ...]], ...]]]:
    """The instructions whose results are buffers of their own (those of computations that are not a fusion's body
    or an op's reducer: `calls=`, `to_apply=`), and the arrays every instruction of the module makes, by name."""
    inner = set(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", hlo))
    found, arrays, keep = [], {}, False
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) [(].*[)] -> .* \{$", line)
        if header:
            keep = header[1] not in inner
            continue
        if not (m := _INSTRUCTION.match(line)):
            continue
        outputs = tuple((dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(m[2]))
        arrays[m[1]] = outputs
        if keep:
            matmul = m[3] == "custom-call" or (m[3] == "fusion" and "kind=kCustom" in line and "gemm" in line)
            found.append(_Buffer(outputs, m[3], tuple(re.findall(r"%([\w.\-]+)", m[4])), matmul))
    return found, arrays


def dense_expert_tensors(hlo: str, config: ModelConfig, tokens: int) -> list[str]:
    """Buffers (not parameters, not free bitcasts) that span every expert: tokens (or their tokens x k expert
    choices) x experts x (hidden size or expert FFN width), `tokens` being what one step runs through the model, as
    XLA's dense lowering of ragged_dot builds; or a whole expert weight stack's worth ([experts, hidden, ffn])."""
    X, E, F, k = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok

    def dense(shape: tuple[int, ...]) -> bool:
        if sorted(shape) == sorted((X, E, F)):  # a whole stack's worth of expert matrices
            return True
        rest = list(shape)
        for dims in ((X,), (tokens, tokens * k)):  # each its own axis (a 128-token chunk has two 128s)
            found = next((d for d in dims if d in rest), None)
            if found is None:
                return False
            rest.remove(found)
        return bool({E, F} & set(rest))

    buffers, _ = _buffers(hlo)
    return sorted({f"{dtype}[{','.join(map(str, shape))}] ({b.opcode})" for b in buffers for dtype, shape in b.outputs
                   if b.opcode not in _NO_NEW_BUFFER and dense(shape)})


def dequantized_buffers(hlo: str, config: ModelConfig) -> list[str]:
    """Buffers of float weights at least one expert matrix large (hidden x expert FFN) computed from int8 or packed
    int4 operands: dequantized weights written out, rather than converted inside the matmul's fusion (a GEMM
    fusion that reads int8 writes only its small product)."""
    buffers, arrays = _buffers(hlo)
    matrix = config.hidden_size * config.moe_intermediate_size

    def quantized(name: str) -> bool:
        return any(dtype in ("s8", "u8", "s4", "u4") for dtype, _ in arrays.get(name, ()))

    return sorted({f"{dtype}[{','.join(map(str, shape))}] ({b.opcode})" for b in buffers for dtype, shape in b.outputs
                   if not b.matmul and b.opcode not in _NO_NEW_BUFFER and dtype in ("bf16", "f16", "f32")
                   and math.prod(shape) >= matrix
                   and any(map(quantized, b.operands))})


def custom_calls(hlo: str) -> list[str]:
    """The custom-call targets, and the kinds of GEMM fusion (Triton, cuBLAS) the program runs."""
    calls = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
    calls |= {f"fusion:{kind}" for kind in re.findall(r'"kind":"(__triton_gemm|__cublas\$gemm|__triton)"', hlo)}
    return sorted(calls)


# ------------------------------------------------------------------------------------------ decode estimate

def decode_estimate(config: ModelConfig, dtype: str, batch: int, context: int, gpu: Target,
                    kv_dtype: str = "model") -> dict[str, float]:
    """An HBM-bound estimate of decode at `batch` rows, each with a full context: the bytes one step must read (every
    weight but the experts and the embedding table once, the distinct experts the batch's tokens choose, one
    embedding row per token, and each row's KV cache) over the target's memory bandwidth. An estimate: no compute,
    launch or host time, and uniform routing."""
    params = abstract_params(config, dtype)
    per_leaf = {name: sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(leaf))
                for name, leaf in named_leaves(params).items()}
    specs = named_leaves(param_specs(config))
    experts = sum(b for n, b in per_leaf.items() if specs[n].axes[0] == "experts")
    embedding = per_leaf["embed"]
    dense = sum(per_leaf.values()) - experts - embedding
    if config.tie_word_embeddings:
        dense += embedding  # the embedding is lm_head too: read whole
    # Expected distinct experts among batch tokens' k choices each, uniform routing.
    X, k = config.num_experts, config.num_experts_per_tok
    chosen = X * (1 - (1 - k / X) ** batch)
    kv_bytes = bytes_per_token(config, "bfloat16", kv_dtype)
    step = dense + experts * chosen / X + batch * embedding / config.vocab_size + batch * context * kv_bytes
    seconds = step / gpu.bandwidth_bytes_per_s
    return {"bytes_per_step": step, "tokens_per_s": batch / seconds}


def format_report(programs: list[Program], gpu: Target, estimates: dict[int, dict[str, float]]) -> str:
    GB = 1e9
    lines = [f"{gpu.description} ({gpu.name}): {gpu.memory_bytes / GB:.1f} GB, {gpu.bandwidth_bytes_per_s / 1e12:.2f} "
             "TB/s; programs compiled without a device (XLA's memory analysis; peak = arguments + outputs not "
             "written in place + temporaries)", "",
             "| program | rows | kernel | arguments GB | temp GB | peak GB | fits | dense expert tensors | dequant "
             "buffer | compile s |", "|---|---:|---|---:|---:|---:|:---:|---|:---:|---:|"]
    for p in programs:
        dequant = "-" if p.dequant_materialized is None else "YES" if p.dequant_materialized else "no"
        lines.append(f"| {p.what} | {p.batch} | {p.moe_kernel} | {p.argument_bytes / GB:.2f} | {p.temp_bytes / GB:.3f}"
                     f" | {p.peak_bytes / GB:.2f} | {'yes' if p.fits else 'NO'} | {'; '.join(p.dense_expert_tensors)}"
                     f" | {dequant} | {p.compile_s:.1f} |")
    lines += ["", "HBM-bound decode estimate (an estimate, not a measurement: bytes each step must read over the "
              "memory bandwidth, full context, uniform routing):", ""]
    for batch, e in estimates.items():
        lines.append(f"- batch {batch}: {e['bytes_per_step'] / GB:.2f} GB a step, at most {e['tokens_per_s']:,.0f} "
                     "tokens/s")
    for p in programs:
        if not p.fits:
            lines.append(f"- does not fit: {p.what}, {p.batch} rows: {p.peak_bytes / GB:.1f} GB > "
                         f"{gpu.memory_bytes / GB:.1f} GB ({why_not(p, gpu)})")
    return "\n".join(lines)


def why_not(program: Program, gpu: Target) -> str:
    """Which part of a program that does not fit is too large: the arguments (params and cache), or the
    temporaries on top of them."""
    if program.argument_bytes > gpu.memory_bytes:
        return "the params and the KV cache alone exceed the device: fewer rows, a shorter context, or int8/int4"
    return ("the arguments fit, the temporary buffers on top do not: a smaller --prefill-chunk, or another "
            "--moe-kernel")
