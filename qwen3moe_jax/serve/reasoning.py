"""Qwen3's thinking block, split off a reply into OpenAI's `reasoning_content` (as vLLM's qwen3 reasoning parser
does):

    <think>
    The user wants the weather.
    </think>

    Let me look it up.

`ReasoningSplitter` works on a stream of text deltas (reply.py feeds it): it holds back a tail that may be the
start of </think> cut across tokens, and a whole reply is one delta with final=True, so streamed and whole
replies split alike.
"""

from __future__ import annotations

from qwen3moe_jax.runtime.text_stream import split_partial

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the prompt leaves a thinking block open, so the reply starts inside it (Qwen3's thinking-only
    templates end the prompt with "<think>\\n"; the reply then carries only </think>)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ReasoningSplitter:
    """Splits a reply into (reasoning, content) deltas. The reasoning is the text of a thinking block that
    opens the reply (leading whitespace allowed) or that the prompt opened (`opened`), without the newlines
    around it; the content is what follows </think>, without its leading whitespace. A reply that does not
    open with <think> is all content. A block that never closes is all reasoning."""

    def __init__(self, opened: bool = False) -> None:
        self.state = "reasoning_start" if opened else "start"
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The (reasoning, content) that `text` completes; final=True flushes everything held back."""
        self.pending += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending, self.state = head[len(THINK_OPEN):], "reasoning_start"
                elif THINK_OPEN.startswith(head) and not final:  # nothing but (the start of) <think> yet
                    return reasoning, content
                else:
                    self.state = "content"
            elif self.state == "reasoning_start":  # the newline after <think>
                self.pending = self.pending.lstrip("\n")
                if not self.pending and not final:
                    return reasoning, content
                self.state = "reasoning"
            elif self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end].rstrip("\n")
                    self.pending, self.state = self.pending[end + len(THINK_CLOSE):], "content_start"
                    continue
                if final:
                    reasoning, self.pending = reasoning + self.pending.rstrip("\n"), ""
                    return reasoning, content
                # Hold back a possible partial </think> and the newlines before it (dropped if it comes).
                shown, self.pending = split_partial(self.pending, [THINK_CLOSE], strip="\n")
                return reasoning + shown, content
            elif self.state == "content_start":  # the blank line after </think>
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return reasoning, content
                self.state = "content"
            else:
                content, self.pending = content + self.pending, ""
                return reasoning, content
