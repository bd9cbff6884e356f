"""The chat format: Molmo-style plain text, not ChatML (spec 6.6).

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    -> " User: <|image|>What is this? Assistant:"

A leading space (the released `always_start_with_space`), then per message the capitalised role,
": " and the content, messages joined by one space; the generation prompt is " Assistant:". BOS is
added by the processor, not here. The exact multi-turn whitespace of the released template was not
verified (spec 8); this is the Molmo template the spec describes, reduced to one rule.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import PromptError
from .tokenizer import IMAGE_PROMPT

ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]


def content_text(content: Any, where: str = "message") -> str:
    """A message's content as text: a string, or a list of parts ({"type": "text", "text": ...} or
    {"type": "image"}, which becomes one `<|image|>` placeholder), concatenated without separators."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise PromptError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image":
            out.append(IMAGE_PROMPT)
        else:
            raise PromptError(f"{where}, part {k}: expected {{'type': 'text', 'text': str}} or "
                              f"{{'type': 'image'}}, got {part!r:.80}")
    return "".join(out)


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True,
                always_start_with_space: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; returns the text and the (start, end) character spans of the assistant
    contents (what a training loss counts)."""
    text = " " if always_start_with_space else ""
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise PromptError(f"{where}: expected a dict with 'role' in {ROLES} and 'content', got {m!r:.80}")
        body = content_text(m.get("content", ""), where)
        text += (" " if i else "") + m["role"].capitalize() + ": "
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(body)))
        text += body
    if add_generation_prompt:
        text += (" " if messages else "") + "Assistant:"
    return text, spans
