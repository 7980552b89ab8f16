"""The prompt format: how a conversation becomes the plain-text prompt a model continues.

The tiny tokenizers trained here have no chat template, so every prompt is plain text in one fixed
format, rendered by :func:`render_prompt`::

    ### System:
    You are terse.

    ### User:
    What does `json.decoder.JSONDecoder.decode` do?

    ### Assistant:

Each turn is a header line, its content and a blank line; the prompt always ends with the
assistant header and a newline, and the model's answer (the completion, or chosen/rejected) follows
it directly. Previous assistant turns of a conversation are part of the prompt. EOS is not part of
the completion: trl appends the tokenizer's own. Post-training trains on this format, and serving
and evaluation prompt in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")
_HEADERS = {role: f"### {role.capitalize()}:\n" for role in ROLES}
ASSISTANT_HEADER = _HEADERS["assistant"]
# Header lines are template, not content: left in, they would give every prompt the n-grams
# "user ... assistant" and shift every short prompt out of reach of the containment check.
_HEADER_LINE = re.compile(r"^### (?:System|User|Assistant):$", re.MULTILINE)


class PromptError(ValueError):
    """Messages that cannot be rendered as a prompt; the error names the message, its field and the fix."""


def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for the assistant's next turn after ``messages`` (every role allowed)."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _HEADERS:
            raise PromptError(f"messages[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        parts.append(f"{_HEADERS[role]}{content}\n\n")
    return "".join(parts) + ASSISTANT_HEADER


def as_prompt(text: str) -> str:
    """A user's prompt string in the prompt format; one already in it is kept as it is."""
    if text.endswith(ASSISTANT_HEADER) and text.startswith(("### System:\n", "### User:\n")):
        return text
    return render_prompt([{"role": "user", "content": text}])


def prompt_content(text: str) -> str:
    """The text with the format's header lines blanked out: what the prompt says, not its template."""
    return _HEADER_LINE.sub(" ", text)
