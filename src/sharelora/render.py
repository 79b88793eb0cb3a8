"""One rendering of ``(prompt, response)`` into the text the reward model reads.

Training, evaluation, ``sharelora score``, TRL's GRPO, the reward server and verl all go through
``render`` (inside ``PairTokenizer``), so the same content gets the same reward wherever it
comes from. A prompt or response is plain text or a list of chat messages
(``{"role": ..., "content": ...}``, TRL's conversational format):

- plain text on both sides is used as it is (an encoder reads it as a text pair);
- messages, with a tokenizer that has a chat template: the template renders the prompt with
  the generation prompt, and the whole conversation; the response is what the conversation adds
  after the prompt. The result already holds the model's special tokens.
- messages, without a chat template (the plain rendering): one message is its content; several
  are ``role: content`` lines. A message's text is its ``content``; tool calls with no content
  are their JSON. So ``[{"role": "user", "content": "Q?"}]`` renders exactly as ``"Q?"``.
"""

from __future__ import annotations

import json
from typing import NamedTuple

Text = str | list  # plain text, or a list of {"role", "content"} messages


class Rendered(NamedTuple):
    prompt: str
    response: str
    templated: bool  # rendered by a chat template: already holds its special tokens


def check_messages(value: object) -> str | None:
    """Why ``value`` is not a valid message list, or ``None`` when it is."""
    if not isinstance(value, list) or not value:
        return "not a non-empty list of messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"message {i} is not an object with a 'role'"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return f"message {i} has non-text content ({type(content).__name__})"
        if content is None and not m.get("tool_calls"):
            return f"message {i} has neither content nor tool_calls"
    return None


def _as_messages(value: Text, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value else []
    problem = check_messages(value)
    if problem:
        raise ValueError(f"cannot render {value!r:.80}: {problem}")
    return value


def message_text(message: dict) -> str:
    """The text of one message: its content, else its tool calls as JSON."""
    content = message.get("content")
    if content is not None:
        return content
    return json.dumps(message.get("tool_calls"), ensure_ascii=False, sort_keys=True)


def _plain(messages: list[dict]) -> str:
    if len(messages) == 1:
        return message_text(messages[0])
    return "\n".join(f"{m['role']}: {message_text(m)}" for m in messages)


def render(prompt: Text, response: Text, tokenizer=None) -> Rendered:
    """The model's input for ``(prompt, response)`` (see the module docstring)."""
    if isinstance(prompt, str) and isinstance(response, str):
        return Rendered(prompt, response, False)
    head, tail = _as_messages(prompt, "user"), _as_messages(response, "assistant")
    if getattr(tokenizer, "chat_template", None):
        start = (
            tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
            if head
            else ""
        )
        full = tokenizer.apply_chat_template(head + tail, tokenize=False)
        if full.startswith(start):
            return Rendered(start, full[len(start) :], True)
        return Rendered("", full, True)  # a template that rewrites earlier turns: keep it whole
    return Rendered(_plain(head) if head else "", _plain(tail), False)
