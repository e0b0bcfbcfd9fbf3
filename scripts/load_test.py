#!/usr/bin/env python
"""Load test of a running server: N concurrent streaming clients, for each N given.

Each client sends `--requests` streaming /v1/completions requests one after another (greedy, `--max-tokens`
new tokens, prompts drawn in turn from a fixed list), so every client count runs the same kind of requests.
Per client count: aggregate generated tokens/s (all clients' completion tokens over the wall time), time to
first token p50 and p99, inter-token latency p50 and p99 (per request, the time from its first to its last
chunk over the tokens between: with decode_steps > 1 tokens arrive in bursts, so single gaps say little),
the longest gap between two chunks of a stream (p99 over requests), and the throughput against the
one-client run of the same test (the requests one at a time), as a table and JSON.

    qwen3moe-jax serve --max-batch 8 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 1,4,8,16 --json benchmarks/load.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

try:
    import httpx
except ImportError as err:  # not in the base install
    raise SystemExit(f"{err}: this script needs the HTTP clients, pip install 'qwen3moe-jax[client]' "
                     "(or -e '.[client]' in a checkout)") from None

PROMPTS = ["def fibonacci(n):\n", "The quick brown fox", "import numpy as np\n", "Once upon a time",
           "class Stack:\n    def __init__(self):\n", "1, 2, 3, 5, 8,", "for i in range(10):\n", "# A short note\n"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streaming request: its completion tokens, time to first token and the gaps between its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"tokens": tokens, "ttft": arrivals[0] - start if arrivals else float("nan"),
            "itl": (arrivals[-1] - arrivals[0]) / (tokens - 1) if tokens > 1 and arrivals else float("nan"),
            "max_gap": max(gaps, default=float("nan"))}


def run(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            for r in range(requests):
                out = one_request(client, url, model, PROMPTS[(index * requests + r) % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
            "itl_p50_s": _percentile(itl, 50), "itl_p99_s": _percentile(itl, 99),
            "max_gap_p99_s": _percentile([r["max_gap"] for r in results], 99),
            "ttft_mean_s": statistics.fmean(ttft)}


def format_table(rows: list[dict]) -> str:
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    lines = ["| clients | requests | tokens | tokens/s | vs 1 client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
             "longest gap p99 |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p99_s'] * 1e3:.0f} ms | "
                     f"{r['itl_p50_s'] * 1e3:.1f} ms | {r['itl_p99_s'] * 1e3:.1f} ms | "
                     f"{r['max_gap_p99_s'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent client counts, comma-separated")
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    one_request(httpx.Client(timeout=600), args.url, model, PROMPTS[0], 4)  # anything left to compile
    rows = []
    for clients in (int(c) for c in args.clients.split(",") if c):
        rows.append(run(args.url, model, clients, args.requests, args.max_tokens))
        print(format_table(rows).splitlines()[-1], flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": args.url, "model": model, "max_tokens": args.max_tokens,
                       "requests_per_client": args.requests, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
