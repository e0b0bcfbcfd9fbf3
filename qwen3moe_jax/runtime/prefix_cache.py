"""Prefix caching: which prompt tokens each KV-cache row holds the keys and values of, and which row a new request
takes, so that it prefills only what no row holds already (the scheduler, scheduler.py, runs the steps).

What is reused, and why it is exact. Prefill runs a prompt in chunks at positions 0, C, 2C, ... (C: the engine's
chunk_size), and a whole chunk [jC, (j+1)C) computed from the same tokens over the same earlier keys and values
gives the same bits whichever request computed it (attention reads a row alone, in blocks summed in a fixed order;
engine.py). So a row's record is the prompt tokens of the whole chunks its prefill has written, prompt[:kC]; a
request reuses the longest prefix it shares with a record, rounded down to a multiple of C, and at most the
chunks before its own last one (which samples its first token). Every chunk it then runs is a chunk its cold run
runs, at the same start and shape, over the same bits: its tokens and logprobs are a cold run's, bit for bit.
Not reused: the tokens of a reply (decode steps write them with another program, whose bits need not equal
prefill's), a partial chunk (a cold run computes it with the tokens after it), and the chunks of a request that
scores its prompt (prompt_logprobs) from the one holding its first scored token's predecessor on: a reused chunk
computes no logits, and a scoring chunk is a program of its own (the scheduler records only what plain prefill
chunks wrote, and gives such a request its `limit`).

A record outlives its request, and is dropped when its row is taken by a request that reuses less of it, or when
the device state is lost (a failed step). Records are at most a row's length each: nothing grows with the
requests served.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

_EMPTY = np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an admitted request goes: its row, the prompt tokens whose KV it reuses, and the busy row to copy
    them from (None: the row holds them already, or nothing is reused)."""

    row: int
    reuse: int
    source: int | None = None


class PrefixCache:
    """Per row, the prompt tokens its KV holds (see the module docstring) and when it was last freed."""

    def __init__(self, rows: int, chunk: int, enabled: bool = True):
        self.chunk = chunk
        self.enabled = enabled
        self.records: list[np.ndarray] = [_EMPTY] * rows
        self._clock = itertools.count()
        self.freed_at = [next(self._clock) for _ in range(rows)]  # row 0 is the least recently used at first

    def reusable(self, prompt: np.ndarray, row: int, limit: int | None = None) -> int:
        """How many tokens of `prompt` may take their KV from `row`: the prefix shared with its record, in whole
        chunks, short of the prompt's last chunk (and of the chunk holding token `limit`, when given)."""
        record = self.records[row]
        m = min(len(record), len(prompt))
        differ = np.flatnonzero(record[:m] != prompt[:m])
        shared = int(differ[0]) if differ.size else m
        C = self.chunk
        end = len(prompt) - 1 if limit is None else min(limit, len(prompt) - 1)
        return min(shared - shared % C, end // C * C)

    def place(self, prompt: Sequence[int], free: Sequence[int], busy: Sequence[int],
              limit: int | None = None) -> Placement:
        """The row for a request of `prompt` among the `free` rows: the one whose record it reuses most (the least
        recently used of them on a tie, or with no reuse at all); when a `busy` row holds a longer prefix than
        every free row, the least recently used free row, with that prefix copied into it. The chosen row's
        record becomes the reused prefix. Disabled, the least recently used free row, reusing nothing (the
        records are still kept, so that enabling it again is safe)."""
        ids = np.asarray(prompt, np.int32)
        by_age = sorted(free, key=self.freed_at.__getitem__)
        reuse = {r: self.reusable(ids, r, limit) if self.enabled else 0 for r in (*free, *busy)}
        row = max(by_age, key=reuse.__getitem__)  # max keeps the first (least recently used) of equals
        placement = Placement(row, reuse[row])
        source = max(busy, key=reuse.__getitem__, default=None)
        if source is not None and reuse[source] > placement.reuse:
            placement = Placement(by_age[0], reuse[source], source)
        self.records[placement.row] = ids[: placement.reuse]
        return placement

    def prefilled(self, row: int, prompt: Sequence[int], upto: int) -> None:
        """The row's prefill has written prompt[:upto]: its record grows to the whole chunks of that."""
        self.records[row] = np.asarray(prompt[: upto - upto % self.chunk], np.int32)

    def free(self, row: int) -> None:
        """The row's request has ended: its record stays, and the row is now the most recently used."""
        self.freed_at[row] = next(self._clock)

    def forget(self) -> None:
        """Drop every record (the device state they describe is gone)."""
        self.records = [_EMPTY] * len(self.records)
