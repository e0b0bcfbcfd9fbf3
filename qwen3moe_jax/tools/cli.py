"""Command line: `qwen3moe-jax generate --prompt TEXT` streams a completion to stdout from the bundled model
(or --model PATH, or random weights at --preset NAME); with --chat the prompt is a user message, formatted by
the model's chat template. `qwen3moe-jax serve` runs the OpenAI-compatible server; `qwen3moe-jax bench`
measures a model (see qwen3moe_jax/tools/bench.py); `eval` runs lm-evaluation-harness tasks and `perplexity`
computes llama.cpp's perplexity of a text file; `qwen3moe-jax aot` compiles the serving programs for a GPU
without one (tools/aot.py); `qwen3moe-jax plan` sizes params and cache on a mesh."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qwen3moe_jax.api import BUNDLED_MODEL, DTYPES, Model, load, random_model
from qwen3moe_jax.errors import ConfigError, Qwen3MoeError
from qwen3moe_jax.model.cache import KV_DTYPES
from qwen3moe_jax.model.config import ModelConfig, preset, preset_names
from qwen3moe_jax.model.moe import MOE_KERNELS
from qwen3moe_jax.runtime import compile_cache
from qwen3moe_jax.runtime.engine import DEFAULT_DECODE_STEPS, DEFAULT_PREFILL_CHUNK
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM
from qwen3moe_jax.tools import aot, bench
from qwen3moe_jax.tools.aot import AOT_DTYPES, TARGETS


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint: a GGUF file or a Hugging Face directory "
                                     "(default: the bundled small model)")
    src.add_argument("--preset", choices=preset_names(), help="random weights at a named shape (configs/)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--moe-kernel", choices=MOE_KERNELS, default="auto",
                   help="how the MoE blocks run (qwen3moe_jax/model/moe.py); auto: only the chosen experts' weights "
                        "at decode, whole blocks per expert at prefill, ragged_dot on TPU (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: min(context, 4096))")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="model",
                   help="the KV cache's: model (the compute dtype) or int8 (a float16 scale per token and head, half "
                        "the bytes of bfloat16) (default: %(default)s)")
    p.add_argument("--init-seed", type=int, default=0, help="weight seed for --preset")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prefill prompts in chunks of this many tokens, a power of two (default: %(default)s)")
    p.add_argument("--decode-steps", type=int, default=DEFAULT_DECODE_STEPS,
                   help="decode steps per device call (default: %(default)s)")
    p.add_argument("--layers", type=int, help="with --preset: keep only its first N layers (a smaller model of the "
                                              "same layer shape)")
    p.add_argument("--speculative", choices=("ngram",), default=None,
                   help="speculative decoding: ngram drafts by prompt lookup, verified with the same tokens as without "
                        "(default: off)")
    p.add_argument("--draft-tokens", type=_at_least(1), default=None,
                   help="with --speculative or --draft-model: the most tokens drafted per step (default: "
                        f"{DEFAULT_DRAFT_TOKENS['ngram']} for ngram, {DEFAULT_DRAFT_TOKENS['draft_model']} with a "
                        "draft model)")
    p.add_argument("--ngram", type=_at_least(1), default=DEFAULT_NGRAM,
                   help="with --speculative ngram: the n-gram a draft needs to match (default: %(default)s)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with a draft model: a checkpoint (GGUF or Hugging Face directory, e.g. "
                        "a dense Qwen3) of the same tokenizer, drafting --draft-tokens tokens per step greedily")
    p.add_argument("--mesh", default="", help="shard over a device mesh, e.g. 'expert=8' or 'data=2,expert=2,"
                                            "tensor=2' (default: one device)")
    multi = p.add_argument_group("multi-host (all three, or the environment variables in brackets)")
    multi.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                       help="HOST:PORT of process 0 [JAX_COORDINATOR_ADDRESS]")
    multi.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                       help="processes in the job [JAX_NUM_PROCESSES]")
    multi.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                       help="this process, 0 .. N-1 [JAX_PROCESS_ID]")


def add_compile_cache_args(p: argparse.ArgumentParser, on_by_default: bool = True) -> None:
    where = (f"default: ${compile_cache.ENV_VAR}, else {compile_cache.default_dir()}" if on_by_default
             else "default: off, so compile times are measured")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", metavar="DIR",
                       help=f"JAX's persistent compilation cache folder, or 'off' ({where})")
    group.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=compile_cache.OFF,
                       help="compile everything afresh, reading and writing no cache")
    p.set_defaults(compile_cache_on_by_default=on_by_default)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def init_distributed(args: argparse.Namespace) -> None:
    """Join a multi-host job when --coordinator is given: every process's devices then form one mesh."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise ConfigError("multi-host needs --coordinator, --num-processes and --process-id together")
    import jax

    # CPU devices talk through gloo (GPUs use NCCL regardless of this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def is_leader() -> bool:
    """Process 0 prints and serves; the others run the same steps silently."""
    import jax

    return jax.process_index() == 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--repeat-last-n", type=int, default=64, help="window of the repetition penalty")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n, seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop,
    )


def preset_config(name: str, layers: int | None) -> ModelConfig:
    """A preset's config, cut to its first `layers` layers when given (--layers)."""
    config = preset(name)
    if layers is None:
        return config
    if not 1 <= layers <= config.num_layers:
        raise ConfigError(f"--layers must be in 1..{config.num_layers} for {name}, got {layers}")
    return config.replace(num_layers=layers)


def build_model(args: argparse.Namespace) -> Model:
    from qwen3moe_jax.model.sharding import make_mesh, parse_mesh

    init_distributed(args)
    # Before anything compiles: JAX sets its persistent cache up once per process.
    # Commands without the options (scripts/determinism.py) leave it off.
    option = getattr(args, "compile_cache", None)
    if option or getattr(args, "compile_cache_on_by_default", False):
        compile_cache.enable(compile_cache.resolve(option))
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    start = time.perf_counter()
    if args.layers is not None and not args.preset:
        raise ConfigError("--layers applies to --preset only")
    engine_args = dict(max_batch=getattr(args, "max_batch", 1), prefill_chunk=args.prefill_chunk,
                       decode_steps=args.decode_steps, prefix_cache=not getattr(args, "no_prefix_cache", False),
                       speculative=args.speculative, draft_tokens=args.draft_tokens, ngram=args.ngram,
                       draft_model=args.draft_model, kv_dtype=args.kv_dtype)
    if not args.preset:
        model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=is_leader(), mesh=mesh,
                     **engine_args, moe_kernel=args.moe_kernel)
    else:
        config = preset_config(args.preset, args.layers)
        # A preset's random weights need a wider init than 0.02 to say anything but one repeated token.
        model = random_model(config, args.dtype, args.init_seed, args.max_seq_len, std=0.2, mesh=mesh, **engine_args,
                             moe_kernel=args.moe_kernel)
    where = f" over a mesh of {dict(mesh.shape)}" if mesh is not None else ""
    _status(f"loaded in {time.perf_counter() - start:.1f}s{where}")
    return model


def model_name(args: argparse.Namespace) -> str:
    """What the model of these arguments is called: the preset, or the checkpoint's file or directory name."""
    if args.preset:
        layers = f" ({args.layers} of {preset(args.preset).num_layers} layers)" if args.layers is not None else ""
        return args.preset + layers
    return Path(args.model or BUNDLED_MODEL).name.removesuffix(".gguf")


def _status(message: str) -> None:
    if is_leader():
        print(f"[{message}]", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = build_model(args)
    text = args.prompt
    if args.chat:
        text, sampling = model.prepare_chat([{"role": "user", "content": args.prompt}], sampling,
                                            enable_thinking=not args.no_think)
    prompt = model.encode(text)
    events = model.stream(prompt, sampling=sampling)  # checks the request before compiling anything
    _status(f"compiling prefill for {len(prompt)} prompt tokens and decode")
    start = time.perf_counter()
    with compile_cache.CacheLookups() as lookups:
        model.engine.warmup(len(prompt), sampling.max_new_tokens)
    _status(f"compiled in {time.perf_counter() - start:.1f}s{lookups.summary()}")

    # Under multi-host every process runs the loop (each step is one collective program); process 0 prints.
    out = sys.stdout if is_leader() else open(os.devnull, "w")
    out.write("" if args.chat else args.prompt)
    for event in events:
        # A model without a tokenizer has no text: show its ids.
        out.write(event.text if model.tokenizer is not None else f" {event.token_id}")
        out.flush()
    out.write("\n")
    usage = event.usage
    _status(f"{usage.completion_tokens} tokens ({event.finish_reason}), prompt {usage.prompt_tokens} tokens, "
            f"time to first token {usage.time_to_first_token_s * 1e3:.0f} ms, "
            f"{usage.decode_tokens_per_s:.1f} tokens/s")
    return 0


# Measured with scripts/load_test.py on the bundled model, 2 CPU cores (README, "Batched generation").
DEFAULT_MAX_BATCH = 8


def cmd_serve(args: argparse.Namespace) -> int:
    from qwen3moe_jax.serve.app import serve  # fastapi and uvicorn load only for this command

    if args.api_key == "":
        raise Qwen3MoeError("--api-key: the key must not be empty")
    if args.max_request_bytes < 1:
        raise Qwen3MoeError(f"--max-request-bytes must be at least 1, got {args.max_request_bytes}")
    model = build_model(args)
    serve(model, args.served_model_name or model_name(args), args.host, args.port, args.warmup_tokens,
          args.api_key, args.max_request_bytes, args.max_queue)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qwen3moe_jax.tools import lm_eval_model  # lm-eval (the eval extra) loads only for this command

    model = build_model(args)
    results = lm_eval_model.evaluate(model, args.tasks.split(","), args.include_path, args.limit, args.num_fewshot)
    print(lm_eval_model.format_results(results))
    if args.json:
        Path(args.json).write_text(lm_eval_model.results_json(results))
        _status(f"wrote {args.json}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """llama.cpp's llama-perplexity on a text file (runtime/evaluation.py), with a progress bar."""
    text = Path(args.file).read_text(encoding="utf-8", errors="replace") if Path(args.file).is_file() else None
    if text is None:
        raise Qwen3MoeError(f"{args.file}: no such file")
    args.max_seq_len = args.max_seq_len or args.context  # the cache holds one window
    model = build_model(args)
    result = model.perplexity(text, args.context, args.stride, args.add_bos, progress=is_leader())
    print(f"perplexity: {result.perplexity:.4f} +/- {result.stderr:.5f} (mean NLL {result.nll:.5f} nats) over "
          f"{result.tokens} tokens in {result.windows} windows of {result.context}"
          + (f", stride {result.stride}" if result.stride else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result) | {"file": str(args.file),
                                                                          "model": model_name(args)}, indent=1) + "\n")
        _status(f"wrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "gpu":
        return _gpu_suite(args)
    if args.json and not Path(args.json).parent.is_dir():  # found out now, not after the whole run
        raise Qwen3MoeError(f"--json: the folder of {args.json} does not exist")
    model = build_model(args)
    result = bench.run_bench(model, model_name(args), args.prompt_lengths, args.decode_tokens, args.batch_sizes,
                             args.repeats, compare_hf=args.compare == "hf", progress=_status)
    if not is_leader():  # the others took part in every step; process 0 reports
        return 0
    print(bench.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        _status(f"wrote {args.json}")
    return 0


def _gpu_suite(args: argparse.Namespace) -> int:
    from qwen3moe_jax.tools import gpu_suite

    if args.model:
        raise ConfigError("--suite gpu draws random weights at a --preset (default qwen3-30b-a3b), not --model")
    report = gpu_suite.run_suite(args, _status)
    json_path, md_path = gpu_suite.write_report(report, args.out_dir)
    print(md_path.read_text())
    _status(f"wrote {json_path} and {md_path}")
    return 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from qwen3moe_jax.model.sharding import parse_mesh
    from qwen3moe_jax.tools.plan import format_plans, plan

    rows = [(name, plan(preset(name), parse_mesh(mesh), dtype, args.context, args.batch, kv_dtype))
            for name in args.preset or ["qwen3-30b-a3b", "qwen3-235b-a22b"]
            for dtype in args.dtype or ["bfloat16", "int8", "int4"]
            for kv_dtype in args.kv_dtype or KV_DTYPES
            for mesh in args.mesh or ["expert=1", "expert=2", "expert=4", "expert=8", "expert=2,tensor=4"]]
    print(format_plans(rows, args.device_memory_gb))
    return 0


def cmd_aot(args: argparse.Namespace) -> int:
    """Compile the serving programs for a GPU that is not here; exit status 1 if one of them does not fit."""
    from qwen3moe_jax.tools.plan import plan

    config = preset_config(args.preset, args.layers).replace(moe_kernel=args.moe_kernel)
    gpu = aot.target(args.target)
    batches = args.batch or [1]
    for batch in batches:  # refused before minutes of compiling: the weights and the cache alone do not fit
        need = plan(config, {}, args.dtype, args.context, batch, args.kv_dtype)
        if need.per_device > gpu.memory_bytes:
            print(f"error: {args.dtype} params ({need.params_per_device / 1e9:.1f} GB) and a KV cache of {batch} x "
                  f"{args.context} tokens ({need.cache_per_device / 1e9:.1f} GB) exceed the {gpu.description}'s "
                  f"{gpu.memory_bytes / 1e9:.1f} GB before any temporary buffer: fewer rows, a shorter context, or "
                  "int8/int4", file=sys.stderr)
            return 1
    programs = aot.compile_programs(config, args.dtype, batches, args.context, gpu, args.prefill_chunk,
                                    args.decode_steps, args.warmup_tokens, args.largest, progress=_status,
                                    kv_dtype=args.kv_dtype)
    estimates = {batch: aot.decode_estimate(config, args.dtype, batch, args.context, gpu, args.kv_dtype)
                 for batch in batches}
    print(aot.format_report(programs, gpu, estimates))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "target": args.target, "device": gpu.description, "device_bytes": gpu.memory_bytes,
            "preset": args.preset, "layers": config.num_layers, "dtype": args.dtype, "kv_dtype": args.kv_dtype,
            "context": args.context,
            "prefill_chunk": args.prefill_chunk, "decode_steps": args.decode_steps,
            "programs": [dataclasses.asdict(p) | {"peak_bytes": p.peak_bytes} for p in programs],
            "decode_estimate": {str(b): e for b, e in estimates.items()}}, indent=1) + "\n")
    return 0 if all(p.fits for p in programs) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3moe-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    add_model_args(gen)
    add_compile_cache_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message via the chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: Qwen3's enable_thinking=False")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions, SSE)")
    add_model_args(srv)
    add_compile_cache_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the model id clients ask for (default: file or preset name)")
    srv.add_argument("--warmup-tokens", type=int, default=256,
                     help="compile prefill for prompts up to this length before serving (one program per power of "
                          "two from 16); lower starts sooner, and a longer prompt compiles its bucket on first use "
                          "(default: %(default)s)")
    srv.add_argument("--max-batch", type=_at_least(1), default=DEFAULT_MAX_BATCH,
                     help="requests that share each decode step (KV-cache rows) (default: %(default)s)")
    srv.add_argument("--max-queue", type=_at_least(0), default=64,
                     help="requests that may wait for a row; more get 503 with Retry-After (default: %(default)s)")
    srv.add_argument("--no-prefix-cache", action="store_true",
                     help="prefill every prompt whole, never reusing the keys and values of a prefix that a KV-cache "
                          "row holds from an earlier request (the replies are the same either way)")
    srv.add_argument("--api-key", default=os.environ.get("QWEN3MOE_JAX_API_KEY") or None,
                     help="require 'Authorization: Bearer KEY' on every /v1 route (default: the environment "
                          "variable QWEN3MOE_JAX_API_KEY, which keeps the key out of the process list; "
                          "neither: no key)")
    # The default is serve.http.DEFAULT_MAX_REQUEST_BYTES, written out: serve/ loads fastapi, only for serve.
    srv.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                     help="larger request bodies get 413 (default: %(default)s, 4 MiB)")
    srv.set_defaults(func=cmd_serve)

    bch = sub.add_parser("bench", help="measure compile times, prefill, time to first token, decode and memory "
                                       "(random weights at any shape with --preset)")
    add_model_args(bch)
    add_compile_cache_args(bch, on_by_default=False)
    bch.add_argument("--prompt-lengths", type=_int_list, default=",".join(map(str, bench.DEFAULT_PROMPT_LENGTHS)),
                     help="prefill lengths to time, comma-separated; those that do not fit the KV cache are skipped "
                          "(default: %(default)s)")
    bch.add_argument("--decode-tokens", type=int, default=bench.DEFAULT_DECODE_TOKENS,
                     help="new tokens per decode request, after the shortest prompt; cut to what the KV cache "
                          "holds (default: %(default)s)")
    bch.add_argument("--batch-sizes", type=_int_list, default=",".join(map(str, bench.DEFAULT_BATCH_SIZES)),
                     help="engine batch sizes to time decode at, beside batch 1 through the generation loop; "
                          "empty for none (default: %(default)s)")
    bch.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported")
    bch.add_argument("--compare", choices=["hf"], help="hf: run transformers on the same weights and report ratios")
    bch.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    suite = bch.add_argument_group("--suite gpu (scripts/gpu_check.sh): weights drawn on the device, every MoE kernel, "
                                   "each dtype, transformers on the first layers; writes OUT_DIR/<device>-<date>.json "
                                   "and .md")
    suite.add_argument("--suite", choices=["gpu"], help="run the GPU check suite (at --preset, default qwen3-30b-a3b)")
    suite.add_argument("--suite-dtypes", type=lambda t: [d for d in t.split(",") if d], default=None,
                       help="comma-separated dtypes (default: bfloat16 and every quantized dtype of --dtype's choices)")
    suite.add_argument("--out-dir", default="benchmarks", help="where the suite writes (default: %(default)s)")
    suite.add_argument("--hf-layers", type=int, default=16, help="layers of the transformers comparison "
                                                                 "(default: %(default)s)")
    bch.set_defaults(func=cmd_bench)

    evl = sub.add_parser("eval", help="lm-evaluation-harness tasks on the model, offline (the eval extra)")
    add_model_args(evl)
    add_compile_cache_args(evl)
    evl.add_argument("--tasks", required=True, help="comma-separated task names (of --include-path, else lm-eval's)")
    evl.add_argument("--include-path", help="a folder of task YAML files (their data local: no download); lm-eval's "
                                            "own tasks are then not indexed")
    evl.add_argument("--limit", type=_at_least(1), help="at most this many documents per task")
    evl.add_argument("--num-fewshot", type=_at_least(0), help="examples in each prompt (default: the task's)")
    evl.add_argument("--max-batch", type=_at_least(1), default=DEFAULT_MAX_BATCH, help="KV-cache rows (default: "
                                                                                       "%(default)s)")
    evl.add_argument("--json", metavar="OUT", help="also write lm-eval's results as JSON")
    evl.set_defaults(func=cmd_eval)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file, windowed as llama.cpp's llama-perplexity")
    add_model_args(ppl)
    add_compile_cache_args(ppl)
    ppl.add_argument("file", help="a text file (UTF-8)")
    ppl.add_argument("--context", type=_at_least(2), required=True, help="tokens per window (llama.cpp's -c)")
    ppl.add_argument("--stride", type=_at_least(1), help="windows every this many tokens, each scoring its last "
                                                         "--stride tokens (llama.cpp's --ppl-stride; default: "
                                                         "consecutive windows scored from their middle)")
    ppl.add_argument("--add-bos", action="store_true", help="start the text (and each window) with the BOS token, "
                                                            "as llama.cpp does for a vocabulary that adds one "
                                                            "(Qwen3's add none)")
    ppl.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    ppl.set_defaults(func=cmd_perplexity)

    pln = sub.add_parser("plan", help="per-device memory of params and KV cache on a mesh, nothing allocated")
    pln.add_argument("--preset", action="append", choices=preset_names(),
                     help="repeatable (default: qwen3-30b-a3b and qwen3-235b-a22b)")
    pln.add_argument("--mesh", action="append",
                     help="e.g. expert=8; repeatable (default: expert=1, 2, 4, 8 and expert=2,tensor=4)")
    pln.add_argument("--dtype", action="append", choices=("bfloat16", "float32", "int8", "int4"),
                     help="repeatable (default: bfloat16, int8 and int4)")
    pln.add_argument("--kv-dtype", action="append", choices=KV_DTYPES,
                     help="the KV cache's, repeatable (default: both, model (the compute dtype) and int8)")
    pln.add_argument("--context", type=int, default=32768, help="KV cache length per row")
    pln.add_argument("--batch", type=int, default=1, help="KV cache rows")
    pln.add_argument("--device-memory-gb", type=float, default=80.0,
                     help="device memory to check against (90%% of it for params + cache)")
    pln.set_defaults(func=cmd_plan)

    ahead = sub.add_parser("aot", help="compile the serving programs for a GPU without one (the aot extra): memory, "
                                     "fit, dense expert tensors, int8/int4 dequantization, a decode estimate")
    ahead.add_argument("--target", choices=TARGETS, required=True)
    ahead.add_argument("--preset", choices=preset_names(), default="qwen3-30b-a3b")
    ahead.add_argument("--dtype", choices=AOT_DTYPES, default="bfloat16")
    ahead.add_argument("--batch", type=_at_least(1), action="append",
                     help="KV-cache rows of a server (--max-batch); repeatable (default: 1)")
    ahead.add_argument("--context", type=_at_least(16), required=True, help="KV cache length (--max-seq-len)")
    ahead.add_argument("--warmup-tokens", type=_at_least(1), default=None,
                     help="prompts the server compiles for at start (default: the whole context)")
    ahead.add_argument("--moe-kernel", choices=MOE_KERNELS, default="auto")
    ahead.add_argument("--kv-dtype", choices=KV_DTYPES, default="model", help="the KV cache's (default: %(default)s)")
    ahead.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    ahead.add_argument("--decode-steps", type=_at_least(1), default=DEFAULT_DECODE_STEPS)
    ahead.add_argument("--layers", type=int, help="compile a cut of the preset, its first N layers (quicker; the "
                                                "arguments and the fit are then the cut's)")
    ahead.add_argument("--largest", action="store_true",
                       help="compile only the prefill chunk and decode block of the widest window per batch (the "
                            "two whose memory decides the fit; each full-depth 30B program takes minutes on 2 cores)")
    ahead.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    ahead.set_defaults(func=cmd_aot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Qwen3MoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
