#!/usr/bin/env python
"""Greedy float32 decode against llama.cpp on the CPU (issue 19.3), the same weights, one run, printing our tokens/s,
llama.cpp's and the ratio:

    python scripts/bench_llamacpp_decode.py                 # the issue's shape, 2 threads for llama.cpp
    python scripts/bench_llamacpp_decode.py --breakdown     # and where a decode step's time goes (see below)

The shape: vocab 8192, hidden 512, 6 layers, 16 experts (top 4) of FFN 256, 8 query / 2 key-value heads of 64.
Random weights are written by qj.save_gguf as an F32 GGUF, which llama.cpp (llama-cpp-python's `generate`, top-k 1)
decodes from the same prompt; ours is `Model.complete`, greedy, no stop tokens. Each side decodes --tokens tokens
after a --prompt-tokens prompt, --repeats times alternately (so load from other processes hits both), and the
medians are compared; tokens/s counts the tokens after the first, as Usage does.

--breakdown times the pieces of one decode step as separate jit functions on the same weights (the MoE block per
kernel, attention over the window, lm_head, sampling) and the whole step, and prints each one's share. It then
profiles the whole step (jax.profiler: XLA:CPU records each thunk it runs) and sums the thunks' times by what they
do, from the compiled HLO: the copies of the chosen experts' weights that XLA:CPU makes before multiplying them,
the expert matmuls, lm_head, the other matmuls (attention, router), and all other ops; and counts the thunks.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.io import llamacpp
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.moe import MOE_KERNELS

SHAPE = qj.ModelConfig(
    vocab_size=8192, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=64, num_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=0, norm_topk_prob=True, rms_norm_eps=1e-6,
    rope_theta=1e6, max_position_embeddings=4096, bos_token_id=0, eos_token_ids=(1,),
)


def ours_rate(model: qj.Model, prompt: list[int], tokens: int) -> float:
    usage = model.complete(prompt, max_new_tokens=tokens, stop_token_ids=[]).usage
    return usage.decode_tokens_per_s


def llamacpp_rate(llm, prompt: list[int], tokens: int) -> float:
    llm.reset()
    times = []
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == tokens:
            break
    return (len(times) - 1) / (times[-1] - times[0])


def breakdown(model: qj.Model, window: int, kernels: list[str], per_token_ms: dict[str, float],
              repeats: int = 300) -> None:
    """Median time of each piece of a batch-1 decode step, each jitted alone on the model's weights, and of the
    whole step (forward over every layer + lm_head + sampling) as one jit call; all timed interleaved, round
    after round, so load from other processes hits every piece alike. per_token_ms: the measured ms/token of
    each kernel's full decode, for the time outside the step (host loop, dispatch, the token's host read)."""
    from qwen3moe_jax.model.cache import KVCache
    from qwen3moe_jax.model.moe import moe
    from qwen3moe_jax.model.transformer import attention, forward, lm_logits, rms_norm
    from qwen3moe_jax.runtime.sampling import SamplerState, SamplingParams, sample

    c, p = model.config, model.params
    x = jax.random.normal(jax.random.key(0), (1, 1, c.hidden_size), jnp.float32)
    pos = jnp.array([[window // 2]], jnp.int32)
    k_cache = jnp.zeros((1, c.num_kv_heads, window, c.head_dim), jnp.float32)
    sampler = SamplerState.from_params([SamplingParams()])
    history = jnp.zeros((1, window), jnp.int32)
    logits = jnp.zeros((1, c.vocab_size), jnp.float32)
    cache = KVCache.init(c, 1, window, jnp.float32)
    layer = p.layers[0]

    def whole_step(cfg):
        def step(tokens, cache):
            hidden, cache, _ = forward(p, tokens, pos[:, 0], cache, cfg, window)
            return sample(lm_logits(p, hidden[:, 0]), sampler, history, pos[:, 0] + 1), cache
        return step

    pieces = {
        "attention over a 256 window, 1 layer": (lambda x, kc: attention(
            layer.attn, rms_norm(x, layer.attn_norm, c.rms_norm_eps), pos, kc, kc, c, window)[0], (x, k_cache)),
        "final norm + lm_head": (lambda x: lm_logits(p, rms_norm(x, p.final_norm, c.rms_norm_eps)), (x,)),
        "sampling": (lambda lg, h: sample(lg, sampler, h, jnp.array([3])), (logits, history)),
        "an empty jit call": (lambda x: x + 1, (x,)),
    }
    for kernel in kernels:
        cfg = c.replace(moe_kernel=kernel)
        pieces[f"MoE block, {kernel}, 1 layer"] = (lambda x, cfg=cfg: moe(layer.mlp, x, cfg)[0], (x,))
        pieces[f"whole step, {kernel} (all layers, one jit)"] = (whole_step(cfg), (jnp.zeros((1, 1), jnp.int32), cache))
    compiled = {name: (jax.jit(f), args) for name, (f, args) in pieces.items()}
    for f, args in compiled.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, (f, args) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"\nPieces of a batch-1 decode step, median of {repeats} interleaved rounds (each piece its own jit call):")
    for name, value in ms.items():
        print(f"  {name:45s} {value:8.3f} ms")
    L = c.num_layers
    for kernel in kernels:
        profile_step(*compiled[f"whole step, {kernel} (all layers, one jit)"], c, kernel)
    for kernel in kernels:
        parts = L * (ms["attention over a 256 window, 1 layer"] + ms[f"MoE block, {kernel}, 1 layer"]) + \
            ms["final norm + lm_head"] + ms["sampling"]
        step = ms[f"whole step, {kernel} (all layers, one jit)"]
        full = per_token_ms.get(kernel, float("nan"))
        print(f"  {kernel}: {L} x (attention + MoE) + lm_head + sampling = {parts:.2f} ms; the whole step "
              f"{step:.2f} ms; full decode {full:.2f} ms/token, so {full - step:.2f} ms outside the step "
              "(host loop, dispatch, reads)")


def profile_step(step, args: tuple, c: qj.ModelConfig, kernel: str, calls: int = 100) -> None:
    """Run the compiled whole step `calls` times under jax.profiler and print the time of its thunks (XLA:CPU's units
    of execution: a fusion, a dot, a copy) summed by what they do, per step. Thunks run on XLA's thread pool, two at
    a time at most on two cores, so the sum can exceed the step's wall time; the shares are what matter."""
    from jax._src.lib import _profile_data

    # Each HLO instruction's result shape and source op, from the compiled module the profiler names thunks by.
    hlo = step.lower(*args).compile().as_text()
    shape_of = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])", hlo, re.M))
    k, E, F, V = c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size, c.vocab_size
    expert_blocks = {f"f32[{k},{E},{F}]", f"f32[{k},{F},{E}]"}
    expert_rows = {f"f32[{k},1,{F}]", f"f32[{k},1,{E}]", f"f32[{k},{F}]", f"f32[{k},{E}]"}

    def what(name: str) -> str:
        shape = shape_of.get(name, "")
        if name.startswith("custom-call"):
            return "the cpu kernel's expert SwiGLU (reads the weights in place)"
        if "gather" in name and shape in expert_blocks:
            return "copies of the chosen experts' weights (gather)"
        if name.startswith("dot") or "ynn" in name:
            if shape in expert_rows:
                return "expert matmuls (on the copies)"
            return "lm_head matmul" if shape.endswith(f",{V}]") else "other matmuls (attention q/k/v/o, scores, router)"
        return "all other ops (norms, rope, softmax, cache writes, routing, combine, sampling)"

    with tempfile.TemporaryDirectory() as tmp:
        jax.block_until_ready(step(*args))
        jax.profiler.start_trace(tmp)
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(step(*args))
        wall = (time.perf_counter() - start) / calls
        jax.profiler.stop_trace()
        profile = _profile_data.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    total: collections.Counter[str] = collections.Counter()
    thunks = 0
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in shape_of and dict(event.stats).get("hlo_module") is not None:
                    total[what(event.name)] += event.duration_ns
                    thunks += 1
    busy = sum(total.values())
    print(f"\n  whole step, {kernel}, profiled over {calls} calls: {wall * 1e3:.2f} ms a step (with the profiler on), "
          f"{thunks / calls:.0f} thunks a step, {busy / calls / 1e6:.2f} ms of thunk time a step:")
    for name, ns in total.most_common():
        print(f"    {ns / calls / 1e6:7.3f} ms  {100 * ns / busy:5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    parser.add_argument("--moe-kernels", default="gather,blocked", type=lambda t: t.split(","),
                        help=f"ours with each of these MoE kernels ({', '.join(MOE_KERNELS)}), comma-separated "
                             "(default: %(default)s: auto's choice at decode, and the sorted blocks)")
    parser.add_argument("--decode-steps", type=int, default=None, help="our decode steps per device call "
                                                                       "(default: the package's)")
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    if not llamacpp.available():
        raise SystemExit(llamacpp.MISSING_REASON)
    import llama_cpp

    extra = {} if args.decode_steps is None else {"decode_steps": args.decode_steps}
    if bad := [k for k in args.moe_kernels if k not in MOE_KERNELS]:
        parser.error(f"--moe-kernels: unknown {bad}; known: {', '.join(MOE_KERNELS)}")
    model = qj.random_model(SHAPE, "float32", seed=0, std=0.05, max_seq_len=512, **extra)
    # llama.cpp loads no GGUF without a vocabulary: a small BPE one (the file pads it to 8192); decoding runs on ids.
    model.tokenizer = Tokenizer.train([__doc__] * 4, vocab_size=320)
    prompt = np.random.default_rng(0).integers(2, SHAPE.vocab_size, args.prompt_tokens).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f32.gguf"
        qj.save_gguf(model, path, "F32")
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                              type_k=llamacpp.GGML_TYPE_F32, type_v=llamacpp.GGML_TYPE_F32, verbose=False)
        ours = {k: qj.Model(SHAPE.replace(moe_kernel=k), model.params, model.tokenizer, 512, **extra)
                for k in args.moe_kernels}
        for m in ours.values():
            m.engine.warmup(len(prompt), args.tokens)
            ours_rate(m, prompt, 4)
        llamacpp_rate(llm, prompt, 4)
        rates: dict[str, list[float]] = {k: [] for k in [*ours, "llama.cpp"]}
        for _ in range(args.repeats):
            for k, m in ours.items():
                rates[k].append(ours_rate(m, prompt, args.tokens))
            rates["llama.cpp"].append(llamacpp_rate(llm, prompt, args.tokens))
        llm.close()
    theirs = statistics.median(rates["llama.cpp"])
    per_token_ms = {k: 1e3 / statistics.median(r) for k, r in rates.items()}
    print(f"greedy f32 decode, {args.tokens} tokens after {len(prompt)}, median of {args.repeats} (interleaved); "
          f"ours with decode_steps {model.engine.decode_steps}, llama.cpp with {args.threads} threads:")
    for name, runs in rates.items():
        rate = statistics.median(runs)
        label = name if name == "llama.cpp" else f"qwen3moe-jax, moe_kernel {name}"
        print(f"  {label:34s} {rate:8.1f} tokens/s  {1e3 / rate:6.2f} ms/token  ratio to llama.cpp "
              f"{rate / theirs:.2f}x  runs {[round(r) for r in runs]}")
    if args.breakdown:
        breakdown(model, 256, [k for k in args.moe_kernels if k != "auto"] or ["gather"], per_token_ms)


if __name__ == "__main__":
    main()
