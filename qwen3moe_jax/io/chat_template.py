"""Chat templates: the Jinja template shipped with a checkpoint, rendered the way transformers'
`apply_chat_template` renders it (same sandbox, whitespace rules, filters and globals)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen3moe_jax.errors import ChatTemplateError

# For checkpoints without a template: plain ChatML, with Qwen3's switch that pre-fills an empty <think>
# block when thinking is turned off.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) to prompt text.

    kwargs reach the template as variables: `tools`, `enable_thinking=False` (Qwen3), `bos_token`, ...
    Malformed messages and the template's own `raise_exception` give ChatTemplateError.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} must be an object with a string 'role'")
        if not isinstance(message.get("content", ""), str | None | list):
            raise ChatTemplateError(f"message {i} has content of type {type(message['content']).__name__}")
    try:
        return _compile(template or CHATML_TEMPLATE).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template failed: {err}") from None
    except TypeError as err:  # e.g. string + None when a message lacks content
        raise ChatTemplateError(f"the chat template could not render these messages: {err}") from None


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template does not parse: {err}") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes HTML characters and sorts keys; templates are written against this one.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")
