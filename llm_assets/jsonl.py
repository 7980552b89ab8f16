"""Reading back the JSONL files this project writes (data sets, eval task documents), and prompt
files (the shipped red-team and benign prompts, a user's own).

One JSON object per line, blank lines skipped; a missing or damaged file raises the caller's own
error type, naming the file and line and saying what to do.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_written_jsonl(path: Path, error: type[ValueError], missing: str, remedy: str) -> list[dict]:
    """The rows of a JSONL file this project wrote (blank lines skipped); a missing or damaged file
    raises ``error`` naming the file (and the line), with ``missing`` / ``remedy`` saying what to do."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{path}: missing; {missing}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: invalid JSON ({exc.msg}); the file is damaged, {remedy}") from None
    return rows


def read_prompt_file(path: Path, error: type[ValueError]) -> list[str]:
    """The ``prompt`` of every line of a prompts JSONL file, in file order (blank lines skipped);
    every bad line is reported at once, raising ``error`` naming the file and line."""
    problems, prompts = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON ({exc.msg}); write one JSON object per line")
            continue
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{path}:{number}: prompt: needs a non-empty string; add it or remove the line")
        else:
            prompts.append(prompt)
    if problems:
        raise error("\n".join(problems))
    if not prompts:
        raise error(f"{path}: no prompts; add lines {{\"prompt\": ...}}")
    return prompts
