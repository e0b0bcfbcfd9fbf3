"""Text that arrives in deltas, one token's worth at a time, in which a tag or a stop string may be cut across
deltas: `split_partial` says how much may be passed on now. Stop strings (`StopStrings`, for generation.py) and the
server's reply parsers (the thinking and tool-call tags, serve/) all hold text back by it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def split_partial(text: str, tags: Iterable[str], strip: str | None = "") -> tuple[str, str]:
    """(what may be passed on, the tail held back): the tail is the longest end of `text` that is the start of one
    of `tags` (a tag cut across deltas; a whole tag is the caller's to find), together with the characters of
    `strip` just before it (None: any whitespace)."""
    held = max((_partial_length(text, tag) for tag in tags), default=0)
    shown = text[:len(text) - held]
    if strip != "":
        shown = shown.rstrip(strip)
    return shown, text[len(shown):]


def _partial_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StopStrings:
    """Text filter for stop strings that may span tokens: text is passed on as soon as it can no longer
    be the start of a stop string; at a stop string, the text before it is passed on and the rest dropped."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""  # text not passed on yet: a suffix that may begin a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to show, whether a stop string was reached)."""
        self.pending += text
        # Everything before `pending` was checked to be no stop string's start, so a match begins in it.
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            shown, self.pending = self.pending[: min(hits)], ""
            return shown, True
        shown, self.pending = split_partial(self.pending, self.stops)
        return shown, False

    def flush(self) -> str:
        shown, self.pending = self.pending, ""
        return shown
