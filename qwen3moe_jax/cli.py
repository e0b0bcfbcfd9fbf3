"""Command line: `qwen3moe-jax generate --model PATH --prompt TEXT` streams a completion to stdout;
with --chat the prompt is a user message, formatted by the model's chat template."""

from __future__ import annotations

import argparse
import sys
import time

from qwen3moe_jax.api import DTYPES, Model, load, random_model
from qwen3moe_jax.config import preset_names
from qwen3moe_jax.errors import Qwen3MoeError
from qwen3moe_jax.sampling import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint: a GGUF file or a Hugging Face directory")
    src.add_argument("--preset", choices=preset_names(), help="random weights at a named shape (configs/)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: min(context, 4096))")
    p.add_argument("--init-seed", type=int, default=0, help="weight seed for --preset")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _build_model(args: argparse.Namespace) -> Model:
    start = time.perf_counter()
    if args.model:
        model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len)
    else:
        # A preset's random weights need a wider init than 0.02 to say anything but one repeated token.
        model = random_model(args.preset, args.dtype, args.init_seed, args.max_seq_len, std=0.2)
    print(f"[loaded in {time.perf_counter() - start:.1f}s]", file=sys.stderr)
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
    )
    model = _build_model(args)
    text, stops = args.prompt, model.config.eos_token_ids
    if args.chat:
        if model.tokenizer is None:
            raise Qwen3MoeError("--chat needs a model with a tokenizer")
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   enable_thinking=not args.no_think)
        stops = model.chat_stop_ids()
    prompt = model.encode(text)
    print(f"[compiling and prefilling {len(prompt)} tokens]", file=sys.stderr)
    start = time.perf_counter()
    first_token_at = None
    count = 0

    def timed_tokens():
        nonlocal first_token_at, count
        for token in model.engine.generate(prompt, args.max_new_tokens, sampling, stops):
            first_token_at = first_token_at or time.perf_counter()
            count += 1
            if not (args.chat and token in stops):  # a chat reply ends at <|im_end|> without printing it
                yield token

    sys.stdout.write("" if args.chat else args.prompt)
    pieces = model.tokenizer.decode_stream(timed_tokens()) if model.tokenizer else map(" {}".format, timed_tokens())
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    ttft = (first_token_at or end) - start
    rate = (count - 1) / (end - first_token_at) if count > 1 and first_token_at else float("nan")
    print(f"[{count} tokens, time to first token {ttft:.2f}s (includes compile), {rate:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3moe-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message via the chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: Qwen3's enable_thinking=False")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
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
