#!/usr/bin/env python
"""Measure a running server's streaming latency: time to first token and the gaps between tokens, over
several streamed chat requests (OpenAI-compatible: this project's `qwen3moe-jax serve`, or any other).

    qwen3moe-jax serve --preset small --port 8000 &
    python scripts/sse_latency.py --url http://127.0.0.1:8000 --requests 5 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time

try:
    import httpx
    import openai
except ImportError as err:  # not in the base install
    raise SystemExit(f"{err}: this script needs the HTTP clients, pip install 'qwen3moe-jax[client]' "
                     "(or -e '.[client]' in a checkout)") from None


def measure(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(seconds to the first content chunk, the gaps between content chunks) of one streamed request."""
    start = time.perf_counter()
    arrivals = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
    return arrivals[0], [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the server's first)")
    parser.add_argument("--prompt", default="Explain mixture-of-experts routing in one paragraph.")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", max_retries=0)
    model = args.model or client.models.list().data[0].id
    print(f"server {args.url} ({httpx.get(f'{args.url}/health').json()}), model {model}")
    measure(client, model, args.prompt, args.max_tokens)  # the first request may compile: not counted
    ttfts, gaps = [], []
    for _ in range(args.requests):
        ttft, request_gaps = measure(client, model, args.prompt, args.max_tokens)
        ttfts.append(ttft)
        gaps += request_gaps
    gaps.sort()
    print(f"{args.requests} requests, {len(gaps) + args.requests} content chunks")
    print(f"time to first token: median {statistics.median(ttfts) * 1e3:.1f} ms, max {max(ttfts) * 1e3:.1f} ms")
    if gaps:
        print(f"gap between tokens: median {statistics.median(gaps) * 1e3:.2f} ms, "
              f"p90 {gaps[int(0.9 * (len(gaps) - 1))] * 1e3:.2f} ms, max {gaps[-1] * 1e3:.2f} ms "
              f"({1 / statistics.median(gaps):.0f} tokens/s)")


if __name__ == "__main__":
    main()
