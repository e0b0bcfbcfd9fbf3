"""The thinking-block splitter (tool_calls.ReasoningSplitter) on Qwen3-format replies, whole and streamed
in every cut, including cuts inside the tags."""

from __future__ import annotations

import pytest

from qwen3moe_jax.serve.reasoning import ReasoningSplitter, prompt_opens_thinking

# (reply, the prompt opened the block, expected reasoning, expected content)
CASES = [
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.", "Hello!"),
    ("  <think>a\n\nb</think>x\n y", False, "a\n\nb", "x\n y"),
    ("Hello, no thinking here.", False, "", "Hello, no thinking here."),
    ("<think>\n\n</think>\n\nplain", False, "", "plain"),
    ("I think <think> is a tag.", False, "", "I think <think> is a tag."),  # not at the start: content
    ("still thinking\n</think>\n\nthe answer", True, "still thinking", "the answer"),
    ("cut off mid-thought\n", True, "cut off mid-thought", ""),
    ("<think>\ncut off mid-thought", False, "cut off mid-thought", ""),
    ("<thi", False, "", "<thi"),  # a reply that ends in what might have been a tag is content after all
    ("x </thin", True, "x </thin", ""),
    ("a</think>b</think>c", True, "a", "b</think>c"),  # only the first </think> closes the block
    ("", False, "", ""),
]


def _split(reply: str, opened: bool, cuts: list[int]) -> tuple[str, str, int]:
    splitter = ReasoningSplitter(opened)
    reasoning = content = ""
    pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.feed("", final=True)
    return reasoning + r, content + c, len(pieces)


@pytest.mark.parametrize(("reply", "opened", "reasoning", "content"), CASES)
def test_a_whole_reply_splits_into_reasoning_and_content(reply, opened, reasoning, content):
    assert ReasoningSplitter(opened).feed(reply, final=True) == (reasoning, content)


@pytest.mark.parametrize(("reply", "opened", "reasoning", "content"), CASES)
def test_a_streamed_reply_splits_alike_wherever_it_is_cut(reply, opened, reasoning, content):
    for i in range(len(reply) + 1):  # one cut anywhere, tags included
        assert _split(reply, opened, [i])[:2] == (reasoning, content), i
    assert _split(reply, opened, list(range(1, len(reply))))[:2] == (reasoning, content)  # character by character


def test_a_partial_tag_is_held_back_and_nothing_else():
    splitter = ReasoningSplitter(opened=True)
    assert splitter.feed("step one </thi") == ("step one ", "")  # "</thi" may be the start of </think>
    assert splitter.feed("nk>\n\nDone") == ("", "Done")
    splitter = ReasoningSplitter()
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("e sea") == ("", "<the sea")  # no tag after all: everything held back goes out


def test_the_prompt_tells_whether_it_opened_the_block():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
