"""`qwen3moe-jax bench --suite gpu` (scripts/gpu_check.sh): the one-command check of a GPU at the 30B-A3B shape.

In one process: random weights drawn on the device (jax.random inside jit, one compiled initializer per distinct
shape: a host init of 30B weights takes minutes); each MoE kernel (model.MOE_KERNELS) on one layer's experts at
decode and prefill sizes (time, compile time, XLA's temporary bytes); then per dtype (bfloat16 and each quantized
dtype of api.DTYPES) the benchmark of bench.py: prefill per prompt length and decode at batch 1 on a cache that
holds the longest prompt, decode at each batch size on a cache sized for the shortest prompt, and one prefill of
every row of the largest batch at once; transformers on the first layers for a ratio where torch has the device.
Writes <out-dir>/<device>-<date>.json and .md with the figures, compile times, peak device memory and the issue's
targets (met or not). On the CPU it runs the same steps at a small preset: the dry run the tests use.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.api import DTYPES, Model, random_model
from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model.config import ModelConfig, preset
from qwen3moe_jax.model.moe import MOE_KERNELS, choose_moe_kernel, moe_local
from qwen3moe_jax.model.params import MoEParams, ParamSpec, param_name, param_specs
from qwen3moe_jax.model.quant import INT8_COMPUTE_DTYPE, QuantizedWeight, contracted_axes, is_quantized
from qwen3moe_jax.runtime.engine import Engine
from qwen3moe_jax.tools import bench

# bfloat16 and every stored-quantized dtype the package has (float32 and float16 are not what a GPU serves).
SUITE_DTYPES = tuple(d for d in DTYPES if d not in ("float32", "float16"))
# Issue 19's targets on one H100 at the 30B-A3B shape, batch 1.
TARGETS = {"bfloat16 decode batch 1, tokens/s": 330.0, "int8 decode batch 1, tokens/s": 500.0,
           "bfloat16 prefill 1024 tokens, ms": 100.0}


# ----------------------------------------------------------------------------------- weights on the device


@partial(jax.jit, static_argnames=("shape", "kind", "dtype", "quantize_axes"))
def _draw(key: jax.Array, std: jax.Array, shape: tuple[int, ...], kind: str, dtype: str,
          quantize_axes: tuple[int, ...] | None) -> Any:
    """One random tensor made on the device: normal(0, std) (ones for a norm) in `dtype`, or int8-quantized over
    quantize_axes as quant.quantize does on the host (scale = absmax / 127, values = round(w / scale))."""
    w = jnp.ones(shape, jnp.float32) if kind == "norm" else std * jax.random.normal(key, shape, jnp.float32)
    if quantize_axes is None:
        return w.astype(dtype)
    absmax = jnp.maximum(w.max(axis=quantize_axes, keepdims=True), -w.min(axis=quantize_axes, keepdims=True))
    scale = absmax / np.float32(127)
    values = jnp.clip(jnp.rint(w / jnp.where(scale > 0, scale, 1)), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values=values, scale=scale)


def device_params(config: ModelConfig, dtype: str, seed: int = 0, std: float = 0.02) -> Any:
    """Random params drawn on the default device, leaf by leaf (jit compiles one initializer per distinct shape
    and kind: a few for the whole model). dtype "int8" quantizes as loading does (quant.host_param): the matrices
    is_quantized picks become QuantizedWeights, the rest bfloat16. None for a dtype drawn only on the host."""
    if dtype not in ("float32", "bfloat16", "float16", "int8"):
        return None
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(config),
                                                         is_leaf=lambda x: isinstance(x, ParamSpec))
    leaves = []
    for index, (path, spec) in enumerate(flat):
        name, axes = None, None
        target = dtype
        if dtype == "int8":
            name = param_name(path)
            axes = contracted_axes(spec.axes) if is_quantized(name, spec.axes) else None
            target = INT8_COMPUTE_DTYPE.name
        leaves.append(_draw(jax.random.fold_in(jax.random.key(seed), index), jnp.float32(std), spec.shape, spec.kind,
                            target, axes))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def suite_model(config: ModelConfig, dtype: str, max_seq_len: int, args: argparse.Namespace,
                notes: list[str]) -> tuple[Model, float]:
    """(a Model of random weights drawn on the device, seconds it took); a dtype without a device initializer is
    drawn on the host (random_model), said in the notes."""
    start = time.perf_counter()
    engine_args = dict(prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps)
    params = device_params(config, dtype, args.init_seed, std=0.02)
    if params is None:
        notes.append(f"{dtype}: weights drawn on the host (no device initializer for this dtype)")
        model = random_model(config, dtype, args.init_seed, max_seq_len, std=0.02, **engine_args)
    else:
        model = Model(config, params, None, max_seq_len, **engine_args)
    jax.block_until_ready(model.params)
    return model, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ MoE kernels


@dataclasses.dataclass
class KernelResult:
    kernel: str  # as asked
    runs_as: str  # what it resolved to at this size (auto picks per shape)
    tokens: int
    ms: float | None  # median of the timed runs; None when it was not run (see note)
    compile_s: float | None
    temp_bytes: int | None  # XLA's temporary buffers for the compiled block
    note: str = ""
    # max |output - the gather kernel's output| / max |the gather kernel's output|: every kernel computes the same
    # block, so a kernel that is fast because it is wrong shows here (rounding alone: ~1e-2 in bfloat16)
    error_vs_gather: float | None = None


def kernel_bench(config: ModelConfig, dtype: str, sizes: list[int], repeats: int,
                 progress: Callable[[str], None]) -> list[KernelResult]:
    """Every kernel of MOE_KERNELS on one MoE layer's weights (drawn on the device) at each token count in sizes,
    timed and checked against the gather kernel's output. A size whose temporary buffers would not fit in the free
    device memory is skipped, with the reason."""
    layer = next(i for i in range(config.num_layers) if config.is_moe_layer(i))
    weights = device_params(config.replace(num_layers=layer + 1), dtype) or device_params(config.replace(
        num_layers=layer + 1), "bfloat16")
    params: MoEParams = weights.layers[layer].mlp
    compute = params.router.dtype
    results = []
    gathered: dict[int, Any] = {}  # tokens -> the gather kernel's output, the reference of the others
    for kernel in ("gather", *(k for k in MOE_KERNELS if k != "gather")):
        if kernel == "cpu" and choose_moe_kernel("auto", 1, config.num_experts, params.gate) != "cpu":
            results += [KernelResult(kernel, kernel, tokens, None, None, None, "not run: float32 weights on the CPU "
                                     "backend only") for tokens in sizes]
            continue
        cfg = config.replace(moe_kernel=kernel)
        step = jax.jit(moe_local, static_argnames="config")
        for tokens in sizes:
            runs_as = choose_moe_kernel(kernel, tokens * config.num_experts_per_tok, config.num_experts, params.gate)
            progress(f"MoE kernel {kernel} ({runs_as}) at {tokens} tokens")
            x = jax.random.normal(jax.random.key(tokens), (1, tokens, config.hidden_size), compute)
            start = time.perf_counter()
            try:
                compiled = step.lower(params, x, cfg).compile()
            except Exception as err:  # noqa: BLE001 - a kernel that does not compile here is a figure too
                results.append(KernelResult(kernel, runs_as, tokens, None, None, None, f"compile failed: {err}"[:300]))
                continue
            compile_s = time.perf_counter() - start
            temp = compiled.memory_analysis().temp_size_in_bytes
            free = _free_device_bytes()
            if free is not None and temp > 0.8 * free:
                note = f"not run: needs {temp / 2**30:.1f} GiB temporary, {free / 2**30:.1f} free"
                results.append(KernelResult(kernel, runs_as, tokens, None, compile_s, temp, note))
                continue
            try:
                out = np.asarray(compiled(params, x)[0], np.float32)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(params, x))
                    times.append(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: recorded, the suite goes on
                results.append(KernelResult(kernel, runs_as, tokens, None, compile_s, temp, f"failed: {err}"[:300]))
                continue
            reference = gathered.setdefault(tokens, out)
            error = float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-30))
            results.append(KernelResult(kernel, runs_as, tokens, statistics.median(times) * 1e3, compile_s, temp,
                                        error_vs_gather=error))
    return results


def _free_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return stats["bytes_limit"] - stats["bytes_in_use"] if stats and "bytes_limit" in stats else None


def _peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


# ------------------------------------------------------------------------------------------ the suite


def batch_prefill_seconds(model: Model, batch: int, prompt: list[int], repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds) of prefilling `prompt` into every row of a batch engine at
    once, to the first sampled tokens on the host."""
    engine = Engine(model.params, model.config, model.max_seq_len, batch, model.mesh, model.engine.chunk_size,
                    model.engine.decode_steps)

    def run() -> float:
        start = time.perf_counter()
        np.asarray(bench._prefill_rows(engine, prompt, bench.SAMPLING, None).token)
        return time.perf_counter() - start

    first = run()
    return first, statistics.median(run() for _ in range(repeats))


def run_suite(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole suite (see the module docstring) as one JSON-ready dict; `args` are bench's command line."""
    config = preset(args.preset or "qwen3-30b-a3b")
    if args.layers is not None:
        config = config.replace(num_layers=args.layers)
    config = config.replace(moe_kernel=args.moe_kernel)
    lengths = sorted(set(args.prompt_lengths))
    batches = sorted(set(args.batch_sizes))
    shortest, longest, top_batch = lengths[0], lengths[-1], max(batches, default=1)
    dtypes = args.suite_dtypes or list(SUITE_DTYPES)
    if unknown := [d for d in dtypes if d not in DTYPES]:
        raise ConfigError(f"--suite-dtypes: unknown {unknown}; known: {', '.join(DTYPES)}")
    if not lengths or lengths[0] < 1:
        raise ConfigError("--suite gpu needs at least one prompt length")
    notes: list[str] = []
    report: dict[str, Any] = {
        "suite": "gpu", "model": args.preset or "qwen3-30b-a3b", "layers": config.num_layers,
        "platform": jax.default_backend(), "device": bench._device_name(), "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "moe_kernel": args.moe_kernel, "prefill_chunk": args.prefill_chunk, "decode_steps": args.decode_steps,
        "init_s": {}, "kernels": [], "runs": {}, "batch_prefill": {}, "peak_memory_bytes": {}, "notes": notes,
    }

    kernel_sizes = sorted({1, top_batch, min(shortest, args.prefill_chunk)})
    report["kernels"] = [dataclasses.asdict(r) for r in kernel_bench(config, dtypes[0], kernel_sizes, max(
        args.repeats, 3), progress)]

    for dtype in dtypes:
        progress(f"{dtype}: drawing the weights on the device")
        # The cache holds the longest prompt at batch 1; the batch engines get one sized for the shortest.
        model, report["init_s"][dtype] = suite_model(config, dtype, longest + args.decode_tokens, args, notes)
        progress(f"{dtype}: prefill {lengths} and decode at batch 1")
        single = bench.run_bench(model, report["model"], lengths, args.decode_tokens, [], args.repeats,
                                 progress=progress)
        runs = {"batch 1": single.to_dict()}
        if batches:
            small = Model(model.config, model.params, None, shortest + args.decode_tokens,
                          prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps)
            progress(f"{dtype}: decode at batch {batches}")
            runs["batches"] = bench.run_bench(small, report["model"], [shortest], args.decode_tokens, batches,
                                              args.repeats, progress=progress).to_dict()
            progress(f"{dtype}: prefill of {top_batch} x {shortest} tokens")
            prompt = np.random.default_rng(1).integers(0, config.vocab_size, shortest).tolist()
            try:
                first, seconds = batch_prefill_seconds(small, top_batch, prompt, args.repeats)
                report["batch_prefill"][dtype] = {"batch": top_batch, "tokens": shortest, "seconds": seconds,
                                                  "first_run_s": first, "tokens_per_s": top_batch * shortest / seconds}
            except Exception as err:  # noqa: BLE001 - out of memory is the finding here
                report["batch_prefill"][dtype] = {"batch": top_batch, "tokens": shortest, "error": str(err)[:300]}
            del small
        report["runs"][dtype] = runs
        report["peak_memory_bytes"][dtype] = _peak_device_bytes()  # the process's peak so far
        del model, single

    report["hf"] = _hf_ratio(config, args, shortest, progress, notes)
    report["targets"] = targets(report)
    return report


def _hf_ratio(config: ModelConfig, args: argparse.Namespace, prompt_len: int, progress: Callable[[str], None],
              notes: list[str]) -> dict[str, Any] | None:
    """bench --compare hf on the first hf_layers layers, bfloat16, batch 1: where transformers and torch are
    installed and torch has the device JAX runs on (on the CPU dry run: the CPU)."""
    try:
        import torch
    except ImportError:
        notes.append("transformers comparison skipped: torch is not installed")
        return None
    if jax.default_backend() == "gpu" and not torch.cuda.is_available():
        notes.append("transformers comparison skipped: torch has no CUDA here")
        return None
    layers = min(args.hf_layers, config.num_layers)
    progress(f"transformers comparison at {layers} layers")
    model, _ = suite_model(config.replace(num_layers=layers), "bfloat16", prompt_len + args.decode_tokens, args, notes)
    result = bench.run_bench(model, f"{args.preset or 'qwen3-30b-a3b'} ({layers} layers)", [prompt_len],
                             args.decode_tokens, [], args.repeats, compare_hf=True, progress=progress)
    return result.to_dict()


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's targets against this report's figures (they are set for one H100 at the 30B-A3B shape)."""

    def decode_1(dtype: str) -> float | None:
        run = report["runs"].get(dtype, {}).get("batch 1")
        return run["decode"][0]["tokens_per_s"] if run else None

    prefill_1k = next((p["seconds"] * 1e3 for p in report["runs"].get("bfloat16", {}).get("batch 1", {}).get(
        "prefill", []) if p["tokens"] == 1024), None)
    rows = [("bfloat16 decode batch 1, tokens/s", decode_1("bfloat16"), lambda v, t: v >= t),
            ("int8 decode batch 1, tokens/s", decode_1("int8"), lambda v, t: v >= t),
            ("bfloat16 prefill 1024 tokens, ms", prefill_1k, lambda v, t: v <= t)]
    out = [{"target": name, "goal": TARGETS[name], "measured": value, "met": None if value is None else ok(value,
            TARGETS[name])} for name, value, ok in rows]
    batch = report["batch_prefill"].get("bfloat16", {})
    out.append({"target": f"prefill {batch.get('batch')} x {batch.get('tokens')} tokens without running out of "
                          "memory", "goal": "no error", "measured": batch.get("error", "ok") if batch else None,
                "met": bool(batch) and "error" not in batch})
    recompiles = [r["recompilations"] for runs in report["runs"].values() for r in runs.values()]
    out.append({"target": "no recompilation after warm-up", "goal": 0, "measured": sum(recompiles),
                "met": sum(recompiles) == 0})
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: targets, MoE kernels, then bench.py's table of each run."""
    lines = [f"# {report['model']} ({report['layers']} layers) on {report['device']}, {report['date']}", "",
             f"{report['platform']}, jax {report['jax_version']}; moe_kernel {report['moe_kernel']}, prefill_chunk "
             f"{report['prefill_chunk']}, decode_steps {report['decode_steps']}; weights drawn on the device in "
             + ", ".join(f"{d} {s:.1f} s" for d, s in report["init_s"].items()), "",
             "Targets (issue 19, set for one H100 at the 30B-A3B shape):", "",
             "| target | goal | measured | met |", "|---|---:|---:|:---:|"]
    for t in report["targets"]:
        value = t["measured"]
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        met = "-" if t["met"] is None else "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['goal']} | {shown} | {met} |")
    lines += ["", "MoE kernels, one layer's experts (ms: median; temp: XLA's temporary buffers; error: max "
              "|difference| from the gather kernel's output, relative to its largest value):", "",
              "| kernel | runs as | tokens | ms | compile s | temp MiB | error | note |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for k in report["kernels"]:
        ms = "" if k["ms"] is None else f"{k['ms']:.3f}"
        comp = "" if k["compile_s"] is None else f"{k['compile_s']:.1f}"
        temp = "" if k["temp_bytes"] is None else f"{k['temp_bytes'] / 2**20:,.1f}"
        error = "" if k.get("error_vs_gather") is None else f"{k['error_vs_gather']:.1e}"
        lines.append(f"| {k['kernel']} | {k['runs_as']} | {k['tokens']} | {ms} | {comp} | {temp} | {error} | "
                     f"{k['note']} |")
    for dtype, b in report["batch_prefill"].items():
        shown = b.get("error") or f"{b['seconds'] * 1e3:,.1f} ms ({b['tokens_per_s']:,.0f} tokens/s)"
        lines += ["", f"{dtype}: prefill of {b['batch']} x {b['tokens']} tokens at once: {shown}"]
    for dtype, peak in report["peak_memory_bytes"].items():
        lines.append(f"{dtype}: peak device memory so far {bench._gib(peak)}")
    for dtype, runs in report["runs"].items():
        for label, run in runs.items():
            lines += ["", f"## {dtype}, {label}", "", bench.format_table(bench_result(run))]
    if report.get("hf"):
        lines += ["", "## transformers", "", bench.format_table(bench_result(report["hf"]))]
    lines += ["", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def bench_result(d: dict[str, Any]) -> bench.BenchResult:
    """A BenchResult back from its to_dict()."""
    d = dict(d, prefill=[bench.Prefill(**p) for p in d["prefill"]], decode=[bench.Decode(**x) for x in d["decode"]])
    if d.get("hf"):
        d["hf"] = bench.HFResult(**dict(d["hf"], prefill=[bench.Prefill(**p) for p in d["hf"]["prefill"]]))
    return bench.BenchResult(**d)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """<out_dir>/<device>-<date>.json and .md; the device name lower-cased, runs of other characters as '-'."""
    stem = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")[:60] + "-" + report["date"][:10]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(format_report(report))
    return json_path, md_path
