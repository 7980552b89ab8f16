"""Data rows of the post-training stages: plain strings, checked once at the door.

SFT rows are ``{"prompt", "completion"}`` (trl's prompt-completion format); preference rows are
``{"prompt", "chosen", "rejected"}``. Either comes as a list of dicts or a `datasets.Dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from llm_assets.prompts import PromptError, chat_renderer, has_chat_template, parse_prompt

Rows = Sequence[Mapping[str, Any]] | Dataset

SFT_KEYS = ("prompt", "completion")
PAIR_KEYS = ("prompt", "chosen", "rejected")


def records(rows: Rows, keys: Sequence[str], what: str) -> list[dict[str, str]]:
    """`rows` as dicts holding exactly `keys`, every value a string; `what` names the rows in errors.

    Other keys are dropped: trl would otherwise pass them to the model or the reward function.
    """
    out = []
    for i, row in enumerate(rows):
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"{what} row {i} has no {', '.join(missing)}: each row needs {', '.join(keys)}")
        not_text = [f"{key} ({type(row[key]).__name__})" for key in keys if not isinstance(row[key], str)]
        if not_text:
            raise ValueError(f"{what} row {i}: {', '.join(not_text)} must be strings")
        out.append({key: row[key] for key in keys})
    if not out:
        raise ValueError(f"{what}: no rows")
    return out


def in_template(rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, what: str) -> list[dict[str, str]]:
    """`records` rows whose prompt (stored in the project's format, the same for every size) is
    re-rendered in the tokenizer's chat template; the rows themselves when it has none."""
    if not has_chat_template(tokenizer):
        return rows
    render, out = chat_renderer(tokenizer), []
    for i, row in enumerate(rows):
        try:
            out.append({**row, "prompt": render(parse_prompt(row["prompt"]))})
        except PromptError as exc:
            raise ValueError(f"{what} row {i}.prompt: {exc}") from None
    return out
