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

A model whose tokenizer carries a chat template (a base model imported by ``base_model``) is
prompted in that template instead: :func:`render_chat` renders the messages with it, and
:func:`parse_prompt` reads back a prompt stored in this format so it can be re-rendered (the post-training data sets
are stored once, in this format, for every size). Its completion is the answer followed by the
tokenizer's eos, as here: a template whose end-of-turn token is not the eos token stops at eos.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy, and only a caller that has a tokenizer needs it
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
_HEADERS = {role: f"### {role.capitalize()}:\n" for role in ROLES}
ASSISTANT_HEADER = _HEADERS["assistant"]
# Header lines are template, not content: left in, they would give every prompt the n-grams
# "user ... assistant" and shift every short prompt out of reach of the containment check.
_HEADER_LINE = re.compile(r"^### (?:System|User|Assistant):$", re.MULTILINE)
# A turn's header where render_prompt puts one: at the start, or after a turn's closing blank line.
_TURN = re.compile(r"(?:^|\n\n)### (System|User|Assistant):\n")


class PromptError(ValueError):
    """Messages that cannot be rendered as a prompt; the error names the message, its field and the fix."""


def _checked(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts, every role known and every content a string."""
    checked = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _HEADERS:
            raise PromptError(f"messages[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for the assistant's next turn after ``messages`` (every role allowed)."""
    return "".join(f"{_HEADERS[m['role']]}{m['content']}\n\n" for m in _checked(messages)) + ASSISTANT_HEADER


def parse_prompt(text: str) -> list[dict[str, str]]:
    """The messages :func:`render_prompt` rendered as ``text`` (its inverse); a text not in the
    format is refused. A content holding a blank line followed by a header line reads as two turns."""
    body = text[: -len(ASSISTANT_HEADER)] if text.endswith(ASSISTANT_HEADER) else None
    if body is None or (body and (not _TURN.match(body) or not body.endswith("\n\n"))):
        raise PromptError(f"not a prompt of the project's format (\"### User:\\n...\\n\\n### Assistant:\\n\"): "
                          f"{text[:80]!r}")
    # re.split with one group: ["", role, content, role, content, ...]; each header but the first
    # consumed the closing blank line of the turn before it, and the last turn's is cut here.
    parts = _TURN.split(body[:-2]) if body else [""]
    return [{"role": role.lower(), "content": content}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template (the project's own tokenizers do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_renderer(tokenizer: PreTrainedTokenizerBase) -> Callable[[Sequence[Mapping[str, str]]], str]:
    """What renders messages as the prompt for the assistant's next turn: the tokenizer's chat
    template when it has one, else the project's format (:func:`render_prompt`).

    A template that writes the bos token is rendered without it when the tokenizer adds bos when
    it encodes, so the prompt's tokens hold one bos, not two. The tokenizer is probed for that here,
    once: the renderer itself only renders the template, and never runs the tokenizer (whose Rust
    state a server's generation thread may be using).
    """
    if not has_chat_template(tokenizer):
        return lambda messages: render_prompt(messages)
    bos = tokenizer.bos_token
    strip = bos if bos and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id] else ""

    def render(messages: Sequence[Mapping[str, str]]) -> str:
        checked = _checked(messages)
        try:
            text = tokenizer.apply_chat_template(checked, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception
            raise PromptError(f"the tokenizer's chat template refused the messages (roles "
                              f"{', '.join(m['role'] for m in checked)}): {type(exc).__name__}: {exc}") from None
        return text[len(strip):] if strip and text.startswith(strip) else text

    return render


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """``messages`` rendered by :func:`chat_renderer` of the tokenizer."""
    return chat_renderer(tokenizer)(messages)


def as_prompt(text: str) -> str:
    """A user's prompt string in the prompt format; one already in it is kept as it is."""
    if text.endswith(ASSISTANT_HEADER) and text.startswith(("### System:\n", "### User:\n")):
        return text
    return render_prompt([{"role": "user", "content": text}])


def prompt_content(text: str) -> str:
    """The text with the format's header lines blanked out: what the prompt says, not its template."""
    return _HEADER_LINE.sub(" ", text)
