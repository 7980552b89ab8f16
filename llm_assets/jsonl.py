"""Reading back the JSONL files this project writes (data sets, eval task documents).

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
