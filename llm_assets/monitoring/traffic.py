"""The server's closed logs, read for one time window and redacted: what `serving_traffic` stores.

The server (llm_assets/serving/records.py) writes `requests-<start>.jsonl` and `feedback-<start>.jsonl`
files, `.jsonl.open` while it appends to them. A window [start, end) is *complete* once no open file
began before its end: every record of the window is then in a closed, immutable file. Its records are
those of the closed files with a `time` in the window.

Texts (prompts, answers, corrections) go through the corpus's own normalisation and PII redaction
(`normalize_text`, `redact_pii` with the manifest's `stages.clean`), so a served email address is
stored as `<EMAIL>` exactly as a corpus one is. The corpus's quality and language filters are not
applied: they drop documents, and a request dropped from the traffic would vanish from the latency,
error-rate and feedback figures. Pure functions, no Dagster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from llm_assets.data.normalize import normalize_text
from llm_assets.data.pii import redact_pii
from llm_assets.manifest import CleanRecipe
from llm_assets.prompts import render_prompt
from llm_assets.serving.records import CLOSED_SUFFIX, OPEN_SUFFIX
from llm_assets.store import hash_file

LOGS = ("requests", "feedback")
REQUESTS_FILE, FEEDBACK_FILE = "requests.parquet", "feedback.parquet"

REQUEST_SCHEMA = {
    "id": pl.String, "time": pl.String, "endpoint": pl.String, "status": pl.Int64, "error": pl.String,
    "latency_s": pl.Float64, "first_token_s": pl.Float64, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
    "model": pl.String, "release": pl.String, "scheme": pl.String,
    # Redacted texts; null when the server ran without --log-prompts.
    "prompts": pl.List(pl.String), "completions": pl.List(pl.String), "pii_redactions": pl.Int64,
}
FEEDBACK_SCHEMA = {
    "id": pl.String, "time": pl.String, "completion_id": pl.String, "rating": pl.Int64, "correction": pl.String,
    "model": pl.String, "release": pl.String, "pii_redactions": pl.Int64,
}


class TrafficLogError(ValueError):
    """A log file cannot be read; the message names the file, the line and what to do."""


@dataclass(frozen=True)
class LogFile:
    path: Path
    started: datetime  # the UTC time the server opened it (its name)
    closed: bool


def log_files(log_dir: Path, log: str) -> list[LogFile]:
    """The files of one log (`requests` or `feedback`), oldest first."""
    found = []
    for path in sorted(Path(log_dir).glob(f"{log}-*")):
        for suffix, closed in ((OPEN_SUFFIX, False), (CLOSED_SUFFIX, True)):
            if path.name.endswith(suffix):
                stamp = path.name.removeprefix(f"{log}-").removesuffix(suffix)
                try:
                    started = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
                except ValueError:
                    break  # not a file the server wrote
                found.append(LogFile(path, started, closed))
                break
    return found


def complete_until(log_dir: Path, now: datetime) -> datetime:
    """Every record before this time is in a closed file: `now`, or the start of the oldest open file."""
    open_starts = [f.started for log in LOGS for f in log_files(log_dir, log) if not f.closed]
    return min([now, *open_starts])


def window_files(log_dir: Path, start: datetime, end: datetime) -> list[LogFile]:
    """The closed files that may hold records of [start, end): opened before its end and last
    written at or after its start (a record is written before its file's last modification)."""
    return [f for log in LOGS for f in log_files(log_dir, log)
            if f.closed and f.started < end and f.path.stat().st_mtime >= start.timestamp()]


def files_signature(files: list[LogFile]) -> list[dict[str, Any]]:
    """Name, size and sha256 of each file: what the window's artifact is built from (its fingerprint)."""
    signature = []
    for f in files:
        sha256, size = hash_file(f.path)
        signature.append({"file": f.path.name, "bytes": size, "sha256": sha256})
    return signature


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrafficLogError(f"{path}:{number}: not a JSON record ({exc.msg}); a closed log is written only by "
                                  "the server: move the file out of the log directory if something else wrote it") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("time"), str):
            raise TrafficLogError(f"{path}:{number}: a record needs a string field `time` (got {line[:80]!r}); move "
                                  "the file out of the log directory if the server did not write it")
        records.append(record)
    return records


def record_time(record: dict[str, Any], where: str) -> datetime:
    try:
        return datetime.fromisoformat(record["time"]).astimezone(UTC)
    except ValueError:
        raise TrafficLogError(f"{where}: field `time` is {record['time']!r}, not an ISO 8601 time") from None


def _prompt_texts(record: dict[str, Any]) -> list[str] | None:
    """The prompts as the model saw them: completions' strings, chats rendered like the SFT data."""
    if "messages" in record:
        return [render_prompt(record["messages"])]
    prompt = record.get("prompt")
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else list(prompt)


class Redactor:
    """The corpus's normalisation and PII redaction (the manifest's `stages.clean`), counting redactions."""

    def __init__(self, recipe: CleanRecipe):
        self.recipe = recipe

    def __call__(self, text: str) -> tuple[str, int]:
        text, found = redact_pii(normalize_text(text, self.recipe.unicode_form), self.recipe.redact,
                                 self.recipe.phone_regions)
        return text, sum(found.values())

    def texts(self, texts: list[str] | None) -> tuple[list[str] | None, int]:
        if texts is None:
            return None, 0
        done = [self(t) for t in texts]
        return [t for t, _ in done], sum(n for _, n in done)


def window_frames(files: list[LogFile], start: datetime, end: datetime,
                  recipe: CleanRecipe) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The requests and the feedback of [start, end) in `files`, texts redacted."""
    redact = Redactor(recipe)
    requests, feedback = [], []
    for f in files:
        for number, record in enumerate(read_records(f.path), 1):
            if not start <= record_time(record, f"{f.path}:{number}") < end:
                continue
            if f.path.name.startswith("feedback-"):
                correction, found = redact.texts(None if record.get("correction") is None else [record["correction"]])
                feedback.append({**{k: record.get(k) for k in FEEDBACK_SCHEMA}, "pii_redactions": found,
                                 "correction": correction[0] if correction else None})
            else:
                prompts, in_prompts = redact.texts(_prompt_texts(record))
                completions, in_answers = redact.texts(record.get("completion"))
                requests.append({**{k: record.get(k) for k in REQUEST_SCHEMA}, "prompts": prompts,
                                 "completions": completions, "pii_redactions": in_prompts + in_answers})
    return (pl.DataFrame(requests, schema=REQUEST_SCHEMA).sort("time"),
            pl.DataFrame(feedback, schema=FEEDBACK_SCHEMA).sort("time"))


def text_frame(requests: pl.DataFrame, feedback: pl.DataFrame) -> pl.DataFrame:
    """Every stored text with an id (`<record id>/<field>/<i>`): what the residual PII scan reads."""
    rows = []
    for record in requests.iter_rows(named=True):
        for field in ("prompts", "completions"):
            rows += [{"id": f"{record['id']}/{field}/{i}", "text": t} for i, t in enumerate(record[field] or [])]
    rows += [{"id": f"{r['id']}/correction", "text": r["correction"]} for r in feedback.iter_rows(named=True)
             if r["correction"] is not None]
    return pl.DataFrame(rows, schema={"id": pl.String, "text": pl.String})
