"""The benchmark behind `qwen3moe-jax bench` and scripts/bench.py: one run of a model measures

- compile time of each jit step and shape it uses (tracing + lowering + XLA compilation, as JAX reports it),
- prefill throughput at each prompt length, batch 1,
- time to first token and decode tokens/s of a batch-1 request through the real generation loop
  (`Model.stream`: sampling, stop checks and detokenization included),
- aggregate decode tokens/s of an `Engine` running several rows at once,
- peak device memory (where the backend reports it), and
- the XLA compilations during the timed runs: 0 when warm-up compiled every shape they use, as it must;
  anything else is a recompilation a user would pay for in the middle of a request,

and, optionally, transformers' Qwen3MoeForCausalLM on the same weights in the same process, with our/HF ratios.

How it measures: each timed section is preceded by a warm-up that runs the same requests once (every prompt
bucket, batch size and attention window the timed runs reach), so compile time stays out of the figures (and is
reported on its own). Every timed run ends on a host read of a sampled token, which waits for the device: the
engine reads each token as it loops, so nothing is in flight when the clock stops. Each figure is the median of
`repeats` runs. Prompts are random token ids, not zeros: which experts run depends on the tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from qwen3moe_jax.api import Model
from qwen3moe_jax.errors import ConfigError, Qwen3MoeError
from qwen3moe_jax.model.params import named_leaves, param_count
from qwen3moe_jax.model.quant import QuantizedWeight
from qwen3moe_jax.runtime.engine import Engine, StepTokens, bucket_length
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.scheduler import DEVICE_FIELDS

DEFAULT_PROMPT_LENGTHS = (128, 1024, 4096)
DEFAULT_DECODE_TOKENS = 256
DEFAULT_BATCH_SIZES = (8, 32)
# Qwen3's recommended non-thinking settings: every stage of the sampler runs, as in a real request. No stop ids,
# so every request decodes exactly its token budget.
SAMPLING = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repeat_penalty=1.05, seed=0, stop_token_ids=())

# The durations jax.monitoring reports for each compilation (names checked against jax 0.10; the tests fail if
# they change): tracing to a jaxpr, lowering to MLIR, and XLA's backend compile. A jit cache hit reports none.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """Records the compilations JAX reports while it is entered (a jax.monitoring listener)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (event, function name, seconds)

    def __enter__(self) -> CompileLog:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in (TRACE_EVENT, LOWER_EVENT, BACKEND_COMPILE_EVENT):
            self.events.append((event, str(kwargs.get("fun_name", "")), duration))

    def compiles(self, since: int = 0) -> int:
        """XLA compilations from event number `since` on."""
        return sum(event == BACKEND_COMPILE_EVENT for event, _, _ in self.events[since:])

    def seconds(self, function: str, since: int = 0) -> float:
        """Time spent tracing, lowering and compiling the jit function named `function` from event `since` on."""
        # Tracing reports the function's own name, lowering and compiling its jit's: jit(prefill_chunk).
        return sum(d for _, name, d in self.events[since:] if name in (function, f"jit({function})"))


@dataclasses.dataclass
class Prefill:
    tokens: int
    seconds: float  # median, from the request to its first sampled token on the host
    tokens_per_s: float


@dataclasses.dataclass
class Decode:
    batch: int
    through: str  # "Model.stream": one request through the generation loop; "Engine": the engine's step loop
    tokens_per_s: float  # median; all rows together: batch * (tokens after the first) / time after the first


@dataclasses.dataclass
class HFResult:
    """transformers on the same weights: prefill as one forward pass returning the last position's logits,
    decode as greedy `generate` with its KV cache, timed at each new token reaching the host."""

    transformers_version: str
    torch_version: str
    device: str
    torch_threads: int  # on the CPU, the faster of torch's default and 1 on a short decode
    thread_probe: dict[str, float]  # that short decode's tokens/s per thread count tried (CPU only)
    attn_implementation: str
    experts_implementation: str
    prefill: list[Prefill]
    ttft_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int | None


@dataclasses.dataclass
class BenchResult:
    model: str
    dtype: str
    params: int
    active_params: int
    max_seq_len: int
    device: str
    platform: str
    jax_version: str
    jaxlib_version: str
    date: str  # UTC, ISO 8601
    repeats: int
    sampling: dict[str, float]
    compile_s: dict[str, float]  # per jit step and shape, e.g. "prefill batch 1, bucket 128"
    prefill: list[Prefill]
    decode_prompt_tokens: int
    decode_tokens: int
    ttft_s: float  # median time to first token of the batch-1 decode request
    decode: list[Decode]  # batch 1 (through Model.stream) first, then the engine batches
    peak_memory_bytes: int | None  # None where the backend does not report it (CPU)
    recompilations: int  # XLA compilations during the timed runs
    notes: list[str]
    hf: HFResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_bench(
    model: Model,
    name: str,
    prompt_lengths: Sequence[int] = DEFAULT_PROMPT_LENGTHS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    compare_hf: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Benchmark `model` (see the module docstring). Prompt lengths that leave no room in the KV cache are
    skipped; the decode requests start from the shortest prompt, and decode_tokens is cut to what the cache
    holds after it. Both are said in the result's notes."""
    if not prompt_lengths or min(prompt_lengths) < 1:
        raise ConfigError(f"prompt lengths must be at least 1 token, got {list(prompt_lengths)}")
    if min(batch_sizes, default=1) < 1:
        raise ConfigError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    if decode_tokens < 2:
        raise ConfigError(f"decode tokens must be at least 2 (a rate needs two tokens), got {decode_tokens}")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    cache_len, notes = model.max_seq_len, []
    lengths = [n for n in sorted(set(prompt_lengths)) if n < cache_len]  # room for the token it samples
    for n in sorted(set(prompt_lengths) - set(lengths)):
        notes.append(f"prompt length {n} skipped: the KV cache holds {cache_len} positions (--max-seq-len)")
    if not lengths:
        raise ConfigError(f"no prompt length fits the {cache_len}-position KV cache; give shorter ones")
    prompt_len = lengths[0]
    if prompt_len + decode_tokens > cache_len:
        notes.append(f"decode tokens cut from {decode_tokens} to {cache_len - prompt_len}: the KV cache holds "
                     f"{cache_len} positions, the prompt takes {prompt_len}")
        decode_tokens = cache_len - prompt_len
    if decode_tokens < 2:
        raise ConfigError(f"the {cache_len}-position KV cache leaves no room to decode after a {prompt_len}-token "
                          "prompt; give a shorter prompt length or a larger --max-seq-len")
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths}
    sampling = dataclasses.replace(SAMPLING, max_new_tokens=decode_tokens)

    compile_s: dict[str, float] = {}
    recompilations = 0
    with CompileLog() as log:

        def warm_up(prefill_label: str | None, decode_label: str | None, run: Callable, *args: Any) -> None:
            """run(*args) once to compile what the timed runs use; note the compile time of each step it compiled."""
            mark = len(log.events)
            run(*args)
            # A speculative model's decode runs verify steps too (runtime/speculative.py): their compiles count there.
            for steps, label in ((("prefill_chunk",), prefill_label), (("decode_block", "verify_block"), decode_label)):
                if label and (seconds := sum(log.seconds(step, mark) for step in steps)):
                    compile_s[label] = seconds

        def timed(run: Callable, *args: Any) -> list:
            """`repeats` results of run(*args), counting the compilations they cause."""
            nonlocal recompilations
            mark = len(log.events)
            results = [run(*args) for _ in range(repeats)]
            recompilations += log.compiles(mark)
            return results

        engine = model.engine
        prefill = []
        for n, ids in prompts.items():
            progress(f"compiling prefill for {n} tokens")
            warm_up(f"prefill batch 1, bucket {bucket_length(n, cache_len)}", None,
                    _first_token_seconds, engine, ids, sampling)
            progress(f"measuring prefill of {n} tokens")
            seconds = statistics.median(timed(_first_token_seconds, engine, ids, sampling))
            prefill.append(Prefill(n, seconds, n / seconds))

        # The decode warm-ups run the whole request the timed runs make: decode compiles once per attention
        # window (engine.py), and a request crosses into a new window as it grows (256, 512, ... positions).
        prompt = prompts[prompt_len]
        # The timed requests repeat one prompt: the prefix cache would serve its later runs (runtime/prefix_cache.py),
        # where the time to first token measured is a new prompt's.
        prefix_cache, model.scheduler.prefix_cache.enabled = model.scheduler.prefix_cache.enabled, False
        try:
            progress("compiling decode, batch 1")
            warm_up(None, "decode batch 1", model.complete, prompt, None, sampling)
            progress(f"measuring decode of {decode_tokens} tokens through Model.stream, batch 1")
            usages = [c.usage for c in timed(model.complete, prompt, None, sampling)]
        finally:
            model.scheduler.prefix_cache.enabled = prefix_cache
        ttft = statistics.median(u.time_to_first_token_s for u in usages)
        decode = [Decode(1, "Model.stream", statistics.median(u.decode_tokens_per_s for u in usages))]

        if batch_sizes and model.speculative is not None:
            notes.append(f"speculative decoding ({model.speculative.method}) in the batch-1 request only: the batch "
                         "rows run plain decode blocks on an engine of their own")
        for batch in batch_sizes:
            # One batch engine at a time, dropped before the next: its KV cache is batch times the model's.
            batch_engine = Engine(model.params, model.config, cache_len, batch, model.mesh, model.engine.chunk_size,
                                  model.engine.decode_steps, kv_dtype=model.engine.kv_dtype)
            progress(f"compiling prefill and decode, batch {batch}")
            warm_up(f"prefill batch {batch}, bucket {bucket_length(prompt_len, cache_len)}", f"decode batch {batch}",
                    _engine_decode_rate, batch_engine, prompt, sampling, decode_tokens)
            progress(f"measuring decode of {decode_tokens} tokens, batch {batch}")
            decode.append(Decode(batch, "Engine", statistics.median(
                timed(_engine_decode_rate, batch_engine, prompt, sampling, decode_tokens))))
            del batch_engine

    stats = jax.local_devices()[0].memory_stats()  # None on CPU
    peak = stats.get("peak_bytes_in_use") if stats else None
    params, active_params = param_count(model.config)
    result = BenchResult(
        model=name, dtype=_dtype_name(model), params=params, active_params=active_params,
        max_seq_len=cache_len, device=_device_name(),
        platform=jax.default_backend(), jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), repeats=repeats,
        sampling={"temperature": SAMPLING.temperature, "top_k": SAMPLING.top_k, "top_p": SAMPLING.top_p,
                  "repeat_penalty": SAMPLING.repeat_penalty, "repeat_last_n": SAMPLING.repeat_last_n},
        compile_s=compile_s, prefill=prefill, decode_prompt_tokens=prompt_len, decode_tokens=decode_tokens,
        ttft_s=ttft, decode=decode, peak_memory_bytes=peak, recompilations=recompilations, notes=notes,
    )
    if compare_hf:
        result.hf = _run_hf(model, prompts, prompt_len, decode_tokens, repeats, progress, notes)
    return result


def _dtype_name(model: Model) -> str:
    bits = {leaf.bits for leaf in named_leaves(model.params).values() if isinstance(leaf, QuantizedWeight)}
    return f"int{min(bits)}" if bits else model.params.embed.dtype.name


def _prefill_rows(engine: Engine, prompt: list[int], sampling: SamplingParams, row: int | None) -> StepTokens:
    """The prompt's chunks into one row (or, row None, into every row at once), sampling set for every row."""
    fields = {f: getattr(sampling, f) for f in DEVICE_FIELDS}
    engine.set_sampling([fields] * engine.batch_size)
    rows = 1 if row is not None else engine.batch_size
    for start in range(0, len(prompt), engine.chunk_size):
        chunk = prompt[start: start + engine.chunk_size]
        out = engine.prefill(row, chunk, start, len(prompt)) if row is not None else \
            engine.prefill(None, [chunk] * rows, [start] * rows, [len(prompt)] * rows)
    return out


def _first_token_seconds(engine: Engine, prompt: list[int], sampling: SamplingParams) -> float:
    """Seconds from a request to its first sampled token on the host: chunked prefill (and the first draw)."""
    start = time.perf_counter()
    np.asarray(_prefill_rows(engine, prompt, sampling, 0).token)
    return time.perf_counter() - start


def _engine_decode_rate(engine: Engine, prompt: list[int], sampling: SamplingParams, new_tokens: int) -> float:
    """Decode tokens/s of all of the engine's rows together: every row prefilled with the prompt at once, then
    decode blocks of every row, each read on the host as the scheduler reads them."""
    B, k = engine.batch_size, engine.decode_steps
    np.asarray(_prefill_rows(engine, prompt, sampling, None).token)
    blocks = max(1, (new_tokens - 1) // k)
    start = time.perf_counter()
    for i in range(blocks):
        np.asarray(engine.decode([len(prompt) + i * k] * B, [True] * B).token)
    return B * blocks * k / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- transformers


class _TokenClock:
    """A transformers streamer that only notes when generate hands it tokens: first the prompt, then each new
    token once it is on the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run_hf(model: Model, prompts: dict[int, list[int]], prompt_len: int, decode_tokens: int, repeats: int,
            progress: Callable[[str], None], notes: list[str]) -> HFResult | None:
    """transformers' Qwen3MoeForCausalLM on the same weights and dtype, on the GPU when JAX runs on one and torch
    has CUDA, else on the CPU: prefill at the same lengths, greedy decode of as many tokens from the same prompt.
    None, with a note, when its copy of the weights does not fit beside ours."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise Qwen3MoeError(f"--compare hf needs torch and transformers ({err}): pip install 'qwen3moe-jax[hf]' "
                            "(or -e '.[hf]' in a checkout)") from None
    from qwen3moe_jax.tools.parity import transformers_model

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if jax.default_backend() != "cpu" and device == "cpu":
        notes.append("torch has no CUDA here: transformers ran on the CPU, JAX on the accelerator")
    no_room = ("transformers is left out: its copy of the weights does not fit in the device memory JAX leaves "
               "(give it room with a lower XLA_PYTHON_CLIENT_MEM_FRACTION, or compare fewer layers with --layers)")
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))
    if device == "cuda" and torch.cuda.mem_get_info()[0] < weight_bytes:  # say so before copying them to the host
        notes.append(no_room)
        return None
    progress(f"building transformers {transformers.__version__} Qwen3MoeForCausalLM with the same weights on {device}")
    threads = torch.get_num_threads()
    try:
        hf = transformers_model(model, device)
        prefill, ttft, rate, probe = _measure_hf(hf, device, prompts, prompt_len, decode_tokens, repeats, progress)
        hf_threads = torch.get_num_threads()
    except torch.OutOfMemoryError:
        notes.append(no_room)
        return None
    finally:
        torch.set_num_threads(threads)
    return HFResult(
        transformers_version=transformers.__version__, torch_version=torch.__version__, device=device,
        torch_threads=hf_threads, thread_probe=probe,
        attn_implementation=hf.config._attn_implementation,
        experts_implementation=getattr(hf.config, "_experts_implementation", None) or "eager",
        prefill=prefill, ttft_s=ttft, decode_tokens_per_s=rate,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
    )


def _measure_hf(hf: Any, device: str, prompts: dict[int, list[int]], prompt_len: int, decode_tokens: int,
                repeats: int, progress: Callable[[str], None]) -> tuple[list[Prefill], float, float, dict[str, float]]:
    """(prefill per prompt length, time to first token, decode tokens/s) of a transformers model, medians, and
    on the CPU the thread probe's tokens/s per thread count (the faster is left set)."""
    import torch

    def first_token_seconds(ids: list[int]) -> float:
        x = torch.tensor([ids], device=device)
        start = time.perf_counter()
        # The last position's logits only, as generate's own prefill asks; .item() waits for the device.
        hf(x, use_cache=True, logits_to_keep=1).logits[0, -1].argmax().item()
        return time.perf_counter() - start

    def generate(ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(time to first token, tokens/s after the first) of a greedy generate, counted as Usage counts ours."""
        x, clock = torch.tensor([ids], device=device), _TokenClock()
        start = time.perf_counter()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
        first, *_, last = clock.times[1:]  # times[0]: the prompt
        return first - start, (len(clock.times) - 2) / (last - first)

    probe = {}
    with torch.inference_mode():
        if device == "cpu":
            progress("transformers: choosing torch's thread count")
            # torch splits every op over all cores by default, which for a small model costs more than it gains
            # (several times over on a busy 2-core machine, measured): keep the baseline at its best, the faster
            # of its default and one thread on a short decode.
            for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
                torch.set_num_threads(threads)
                generate(prompts[prompt_len], 2)
                probe[str(threads)] = generate(prompts[prompt_len], min(decode_tokens, 16))[1]
            torch.set_num_threads(int(max(probe, key=probe.__getitem__)))
        prefill = []
        for n, ids in prompts.items():
            progress(f"transformers: measuring prefill of {n} tokens")
            first_token_seconds(ids)  # warm-up: kernels, their workspaces, allocator pools
            seconds = statistics.median(first_token_seconds(ids) for _ in range(repeats))
            prefill.append(Prefill(n, seconds, n / seconds))
        progress(f"transformers: measuring greedy decode of {decode_tokens} tokens")
        generate(prompts[prompt_len], 2)
        runs = [generate(prompts[prompt_len], decode_tokens) for _ in range(repeats)]
    return prefill, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), probe


# --------------------------------------------------------------------------------------------- reporting


def _device_name() -> str:
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()}, {cores} cores"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def format_table(result: BenchResult) -> str:
    """The result as a heading and a Markdown table (readable as plain text too); with transformers' figures
    beside ours, and our speed-up over them, when the result has them."""
    r, hf = result, result.hf
    lines = [
        f"{r.model}: {r.params / 1e6:,.1f} M parameters ({r.active_params / 1e6:,.1f} M active), {r.dtype}, "
        f"KV cache {r.max_seq_len} positions",
        f"{r.platform}: {r.device}; jax {r.jax_version}, jaxlib {r.jaxlib_version}; {r.date}",
        f"median of {r.repeats} runs; decode: {r.decode_tokens} new tokens after a prompt of {r.decode_prompt_tokens} "
        "tokens, sampled (" + ", ".join(f"{k} {v}" for k, v in r.sampling.items()) + ")",
    ]
    if hf:
        threads = ""
        if hf.thread_probe:
            tried = ", ".join(f"{n} thread{'s' * (int(n) > 1)} {rate:,.1f}" for n, rate in hf.thread_probe.items())
            threads = f", {hf.torch_threads} thread{'s' * (hf.torch_threads > 1)} (short decode, tokens/s: {tried})"
        lines.append(f"transformers {hf.transformers_version} (torch {hf.torch_version}) on {hf.device}{threads}, "
                     f"attention {hf.attn_implementation}, experts {hf.experts_implementation}, the same weights and "
                     "dtype; its decode is greedy generate")

    rows = []
    hf_prefill = {p.tokens: p for p in hf.prefill} if hf else {}
    for p in r.prefill:
        theirs = hf_prefill.get(p.tokens)
        rows.append((f"prefill {p.tokens} tokens, tokens/s", _num(p.tokens_per_s),
                     *_versus(p.tokens_per_s, theirs and theirs.tokens_per_s)))
    rows.append((f"time to first token, prompt of {r.decode_prompt_tokens} tokens, ms", _num(r.ttft_s * 1e3),
                 *_versus(1 / r.ttft_s, hf and 1 / hf.ttft_s, f"{hf.ttft_s * 1e3:,.1f}" if hf else "")))
    for d in r.decode:
        if d.through == "Model.stream":
            rows.append((f"decode, batch {d.batch} ({d.through}), tokens/s", _num(d.tokens_per_s),
                         *_versus(d.tokens_per_s, hf and hf.decode_tokens_per_s)))
        else:
            rows.append((f"decode, batch {d.batch} ({d.through}, all rows), tokens/s", _num(d.tokens_per_s), "", ""))
    rows.append(("peak device memory", _gib(r.peak_memory_bytes), _gib(hf.peak_memory_bytes) if hf else "", ""))
    rows.append(("recompilations after warm-up", str(r.recompilations), "", ""))
    rows += [(f"compile {label}, s", f"{seconds:.2f}", "", "") for label, seconds in r.compile_s.items()]

    header = ("", "qwen3moe-jax", "transformers", "speed-up") if hf else ("", "qwen3moe-jax")
    table = [header, *(cells[: len(header)] for cells in rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                 for i, (cell, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    lines += ["", line(header), rule, *(line(cells) for cells in table[1:])]
    if r.notes:
        lines += ["", *(f"- {note}" for note in r.notes)]
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.1f}"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:,.2f} GiB"


def _versus(ours_rate: float, their_rate: float | None, their_text: str | None = None) -> tuple[str, str]:
    """(their figure, our speed-up over it) from two rates (higher is faster); blank without theirs."""
    if not their_rate:
        return "", ""
    return their_text or _num(their_rate), f"{ours_rate / their_rate:.2f}x"
