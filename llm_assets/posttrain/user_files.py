"""Post-training examples read from user JSONL files, every malformed line reported at once.

User files (one JSON object per line, blank lines skipped). SFT: ``{"messages": [{"role":
"system"|"user"|"assistant", "content": str}, ...]}`` whose last message is the assistant's answer,
or ``{"prompt": str, "completion": str}``. Preference: ``{"prompt": str, "chosen": str,
"rejected": str}``. A ``prompt`` string is the user's turn and is rendered as such, unless it is
already in the prompt format (so a written ``train.jsonl`` can be fed back as a user file). Other
keys are ignored, so records may carry their own metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from llm_assets.posttrain.dataset_schema import PREFERENCE_COLUMNS, SFT_COLUMNS, DataSetError
from llm_assets.prompts import ROLES, as_prompt, render_prompt

MAX_REPORTED_ERRORS = 20


class _LineError(Exception):
    """One record's problem; the reader adds the file and line."""


def _text(record: dict, key: str, where: str = "") -> str:
    name = f"{where}{key}"
    if key not in record:
        raise _LineError(f"field {name!r} is missing; add it as a non-empty string")
    value = record[key]
    if not isinstance(value, str):
        raise _LineError(f"field {name!r} must be a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise _LineError(f"field {name!r} is empty; give it text or remove the line")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError(
            f"field {name!r} contains an unpaired surrogate escape (like \\ud800), which is no text; fix the escape"
        ) from None
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages_example(record: dict) -> tuple[str, str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _LineError(
            "field 'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects, "
            f"got {_short(messages)}"
        )
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(message, dict):
            raise _LineError(
                f"field 'messages[{i}]' must be an object {{\"role\", \"content\"}}, got {_short(message)}"
            )
        if "role" not in message and {"from", "value"} <= message.keys():
            raise _LineError(
                f"field 'messages[{i}]' uses 'from'/'value' (ShareGPT); rename them to 'role'/'content' "
                f"with roles {', '.join(ROLES)}"
            )
        role = _text(message, "role", where)
        if role not in ROLES:
            raise _LineError(f"field '{where}role' has unknown role {role!r}; use one of {', '.join(ROLES)}")
        checked.append({"role": role, "content": _text(message, "content", where)})
    if checked[-1]["role"] != "assistant":
        raise _LineError(
            f"field 'messages' ends with a {checked[-1]['role']!r} message; the last message must be the "
            "assistant's answer (it is the completion)"
        )
    if not any(m["role"] == "user" for m in checked[:-1]):
        raise _LineError("field 'messages' has no user message before the assistant's answer; add the question")
    return render_prompt(checked[:-1]), checked[-1]["content"]


def _sft_record(record: dict) -> tuple[str, ...]:
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise _LineError("has both 'messages' and 'prompt'/'completion'; use one format per line")
        return _messages_example(record)
    if "prompt" not in record and "completion" not in record:
        raise _LineError(
            f"has neither 'messages' nor 'prompt' and 'completion' (keys: {', '.join(sorted(record)) or 'none'}); "
            "write {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}"
        )
    return as_prompt(_text(record, "prompt")), _text(record, "completion")


def _preference_record(record: dict) -> tuple[str, ...]:
    prompt, chosen, rejected = (_text(record, key) for key in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise _LineError("fields 'chosen' and 'rejected' are identical; a pair must prefer one answer to another")
    return as_prompt(prompt), chosen, rejected


def _read_jsonl(
    path: Path, parse: Callable[[dict], tuple[str, ...]], columns: tuple[str, ...], manifest_field: str, shape: str
) -> pl.DataFrame:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataSetError(f"{path}: no such file; fix its path in {manifest_field} of the manifest") from None
    except IsADirectoryError:
        raise DataSetError(f"{path}: is a directory, not a JSONL file; fix {manifest_field} in the manifest") from None
    rows: list[tuple[str, ...]] = []
    errors: list[str] = []
    bad = 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.removesuffix(b"\r")
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM is an editor's habit, not an error
        if not line.strip():
            continue
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _LineError(f"not valid UTF-8 at byte {exc.start} of the line; save the file as UTF-8") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _LineError(
                    f"invalid JSON at column {exc.colno}: {exc.msg}; each line must be one complete JSON object"
                ) from None
            if not isinstance(record, dict):
                raise _LineError(f"expected a JSON object {shape}, got a {type(record).__name__}")
            rows.append((f"{path.name}:{number}", f"file:{path.name}", *parse(record)))
        except _LineError as exc:
            bad += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"{path}:{number}: {exc}")
    if errors:
        more = f"\n  ... and {bad - len(errors)} more" if bad > len(errors) else ""
        raise DataSetError(
            f"{path}: {bad} malformed line{'s' * (bad != 1)} (each line must be {shape}; fix or remove "
            f"them):\n  " + "\n  ".join(errors) + more,
            errors,
        )
    if not rows:
        raise DataSetError(f"{path}: no records, only blank lines; add examples or remove it from {manifest_field}")
    return pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")


def read_sft_jsonl(path: Path | str) -> pl.DataFrame:
    """SFT rows of a user file; every malformed line (up to a cap) is reported in one DataSetError."""
    return _read_jsonl(
        Path(path), _sft_record, SFT_COLUMNS, "stages.posttrain_data.sft_files",
        '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}',
    )


def read_preference_jsonl(path: Path | str) -> pl.DataFrame:
    """Preference rows of a user file; every malformed line (up to a cap) is reported in one DataSetError."""
    return _read_jsonl(
        Path(path), _preference_record, PREFERENCE_COLUMNS, "stages.posttrain_data.preference_files",
        '{"prompt": ..., "chosen": ..., "rejected": ...}',
    )
