#!/usr/bin/env python
"""Prompt lookup's settings replayed offline on the bundled model, with the step costs measured on this machine
(issue 34). Greedy tokens are the same with or without speculation, so any drafting policy can be replayed exactly
on one run's tokens, without the noise of timing every policy on a shared machine:

1. greedy continuations (--new-tokens) of the benchmark's greedy prompts (bench_speculative.py) and of --prompts
   held-out snippets (200 tokens each of standard-library files the bundled model never trained on);
2. how much of a draft is kept, by the length of the match that cued it (the first drafted token, and the mean);
3. the time of each verify step the scheduler runs, in plain decode blocks (run back to back): after decode blocks,
   back to back, and what the decode block after it costs more (a program run after another runs slower here);
4. the library's own Speculator (NgramDrafter, DraftBudget) driven over every continuation as the scheduler drives
   it, one request at a time, each call charged those costs: the estimated speed-up over plain decoding per n-gram
   size, and with every verify step made --dearer times as costly (a machine where verifying costs more, as a
   large MoE's steps can on a GPU: Cascade, arXiv:2506.20675).

    python scripts/speculative_replay.py                     # 60 held-out prompts, 128 tokens each
    python scripts/speculative_replay.py --prompts 30 --new-tokens 512 --ngrams 3,4,5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import qwen3moe_jax as qj
from qwen3moe_jax.runtime.scheduler import DEVICE_FIELDS
from qwen3moe_jax.runtime.speculative import NgramIndex, SpeculativeConfig, Speculator

sys.path.insert(0, str(Path(__file__).parent))  # the benchmark's prompts and the held-out snippets: sibling scripts
from bench_speculative import CASES  # noqa: E402
from kv_int8_drift import held_out_prompts  # noqa: E402

GREEDY = {field: getattr(qj.SamplingParams(), field) for field in DEVICE_FIELDS}  # the defaults: greedy
MATCH_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 9, 12)  # a match of at least this many tokens, up to the next


@dataclasses.dataclass(eq=False)
class Row:
    """What the Speculator reads of a request."""

    prompt: list[int]
    output: list[int]


def kept(draft: list[int], truth: list[int]) -> int:
    """How many of the draft's tokens lead the true continuation."""
    n = 0
    while n < min(len(draft), len(truth)) and draft[n] == truth[n]:
        n += 1
    return n


def acceptance_by_match(texts: list[tuple[list[int], list[int]]]) -> list[tuple[str, int, float, float]]:
    """(match lengths, drafts, share whose first token is kept, mean tokens kept) of a 31-token lookup at every
    position of every continuation, by the length of the match (2-gram lookups: every match of 2 tokens and up)."""
    by_bucket: dict[int, list[int]] = {b: [] for b in MATCH_BUCKETS}
    for prompt, tokens in texts:
        index = NgramIndex(2, prompt + tokens[:1])
        for i in range(1, len(tokens) - 1):
            found = index.match(31)
            if found:
                bucket = max(b for b in MATCH_BUCKETS if b <= found[1])
                by_bucket[bucket].append(kept(index.propose(31), tokens[i:]))
            index.extend(tokens[i: i + 1])
    rows = []
    for b, nxt in zip(MATCH_BUCKETS, MATCH_BUCKETS[1:] + (None,), strict=True):
        got = np.array(by_bucket[b])
        label = str(b) if nxt == b + 1 else f"{b}+" if nxt is None else f"{b}-{nxt - 1}"
        rows.append((label, len(got), float(np.mean(got >= 1)) if len(got) else float("nan"),
                     float(got.mean()) if len(got) else float("nan")))
    return rows


def step_costs(model: qj.Model, position: int, repeats: int, seed: int = 0) -> tuple[dict, float, float]:
    """Each verify step's time (by drafted tokens and decode steps after it) in plain decode blocks, as
    {(drafted, tail): (after decode blocks, back to back)}, the decode block's extra time right after a verify step
    (in blocks), and the block's own time (s). Measured at `position` in one row, each step in turn `repeats` times:
    decode, decode, decode, verify, verify, each time against the mean of its own second and third decode blocks
    (this machine's speed drifts from second to second); medians."""
    engine = model.engine
    rng = np.random.default_rng(seed)
    engine.set_sampling([GREEDY] + [None] * (engine.batch_size - 1))
    prompt = rng.integers(1, model.config.vocab_size, position).tolist()
    for start in range(0, position, engine.chunk_size):
        engine.prefill(0, prompt[start: start + engine.chunk_size], start, position)
    active = [True] + [False] * (engine.batch_size - 1)
    positions = [position] * engine.batch_size

    def timed(op: str, **kwargs) -> float:
        started = time.perf_counter()
        np.asarray(engine.call(op, positions=positions, active=active, **kwargs).token)
        return time.perf_counter() - started

    steps = {}
    for width in engine.widths:
        drafts = [rng.integers(1, model.config.vocab_size, width - 1).tolist()] + [[]] * (engine.batch_size - 1)
        steps[(width - 1, engine.tail(drafts, active, False))] = drafts
    ratios: dict = {key: ([], []) for key in steps}
    blocks, after = [], []
    for i in range(repeats + 2):  # the first two compile and warm up
        for key, drafts in steps.items():
            first, *block = (timed("decode") for _ in range(3))
            cold, hot = (timed("verify", drafts=drafts, tail=key[1]) for _ in range(2))
            if i >= 2:
                ref = sum(block) / 2
                blocks.append(ref)
                after.append(first / ref - 1)
                ratios[key][0].append(cold / ref)
                ratios[key][1].append(hot / ref)
    costs = {key: (statistics.median(cold), statistics.median(hot)) for key, (cold, hot) in ratios.items()}
    return costs, statistics.median(after), statistics.median(blocks)


def replay(prompt: list[int], tokens: list[int], config: SpeculativeConfig, engine, costs: dict, back: float,
           dearer: float = 1.0) -> float:
    """The Speculator over one greedy continuation, one request alone, each call charged its measured cost (a
    plain decode block 1, run back to back; a verify step `dearer` times its cost, cold after another program or
    back to back after itself; a decode block after a verify step 1 + back). Returns plain decoding's time over it."""
    speculator = Speculator(config)
    steps = engine.decode_steps
    row = Row(list(prompt), tokens[:1])  # the first token comes with the prompt's last chunk
    spent, last = 0.0, "decode"
    while len(row.output) < len(tokens):
        room = len(tokens) - len(row.output) - 1
        drafts = speculator.drafts([row], [room])
        if drafts is None:
            made, cost = steps, 1.0 + (back if last != "decode" else 0.0)
            last = "decode"
        else:
            draft = drafts[0]
            tail = engine.tail(drafts, [True], False)
            key = (engine.width(drafts) - 1, tail)
            accepted = kept(draft, tokens[len(row.output):])
            made = accepted + 1 + tail
            cost = dearer * costs[key][1 if last == key else 0]
            speculator.record(row, len(draft), accepted)
            last = key
        row.output += tokens[len(row.output): len(row.output) + made]
        spent += cost
    return (len(tokens) - 1) / steps / spent


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=_positive, default=60)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ngrams", default="2,3,4,5,6")
    p.add_argument("--dearer", type=float, default=2.0, help="the verify steps' cost factor of the last table")
    p.add_argument("--repeats", type=int, default=40, help="timed runs of each step")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    plain = qj.load(progress=False, max_batch=1)
    spec = qj.load(progress=False, max_batch=1, speculative="ngram")
    named = {name: plain.encode(prompt) for name, (prompt, extra) in CASES.items() if not extra}
    held = held_out_prompts(plain, args.prompts, args.seed, length=200)
    texts = [(ids, plain.generate(ids, args.new_tokens, stop_token_ids=[])) for ids in list(named.values()) + held]
    print(f"bundled model, {len(named)} benchmark prompts and {len(held)} held-out ones, {args.new_tokens} greedy "
          "tokens each\n")

    print("| match (tokens) | lookups | first token kept | tokens kept (mean of 31 drafted) |\n|---|---:|---:|---:|")
    for label, n, first, mean in acceptance_by_match(texts):
        print(f"| {label} | {n} | {first:.0%} | {mean:.1f} |")

    costs, back, block = step_costs(spec, 200, args.repeats)
    print(f"\nplain decode block ({spec.engine.decode_steps} steps): {block * 1e3:.2f} ms; the block right after a "
          f"verify step: +{back:.2f} blocks\n\n| verify step | after decode blocks | back to back |\n|---|---:|---:|")
    for (drafted, tail), (cold, hot) in costs.items():
        print(f"| {drafted} drafted + {tail} decode steps | {cold:.2f} | {hot:.2f} |")

    print("\nEstimated speed-up over plain decoding (benchmark prompts; held-out: median, 10th percentile, least):\n")
    names = [n.split(" (")[0] for n in named]
    print(f"| verify cost | n-gram | {' | '.join(names)} | held-out median | p10 | least |")
    print("|---|---:|" + "---:|" * (len(names) + 3))
    for dearer in (1.0, args.dearer):
        for ngram in (int(n) for n in args.ngrams.split(",")):
            config = SpeculativeConfig("ngram", ngram=ngram)
            ratios = [replay(prompt, tokens, config, spec.engine, costs, back, dearer) for prompt, tokens in texts]
            mine, rest = ratios[: len(named)], ratios[len(named):]
            print(f"| {'measured' if dearer == 1 else f'x{dearer:g}'} | {ngram} | "
                  + " | ".join(f"{r:.2f}x" for r in mine) + f" | {statistics.median(rest):.2f}x | "
                  f"{np.percentile(rest, 10):.2f}x | {min(rest):.2f}x |")


if __name__ == "__main__":
    main()
