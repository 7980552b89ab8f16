"""Durable, rotated JSONL logs: the server's request log and its feedback.

`DurableLog(directory, "requests")` appends one JSON object per line to an open file
`requests-<start>.jsonl.open`, where `<start>` is the UTC time it was opened (`20261122T055803.385123Z`).
`append` returns a future that resolves once the record is on disk (written and fsynced): the server
answers a request only after that, so a record it acknowledged survives the process being killed
(SIGKILL) and the machine losing power. One writer thread commits whatever records have gathered
with one write and one fsync (group commit): concurrent requests share the cost of a sync.

Rotation, by size (`max_bytes`) or age (`max_age_s`, also when no record arrives), closes the file:
fsync, then rename to `requests-<start>.jsonl`. A closed file is never written again, so a reader
takes `<prefix>-*.jsonl` (closed, immutable) and leaves `*.jsonl.open` alone. Opening a log closes
the open files a killed server left behind, cutting off a torn last line (a record that was never
acknowledged: it was not fully written, so it was not synced).

`read_log` reads a log as it stands, the open file included (its whole lines), for a reader that
must see the latest traffic (the canary's report) rather than wait for a file to close.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_assets.store import fsync_path

OPEN_SUFFIX = ".jsonl.open"
CLOSED_SUFFIX = ".jsonl"


class DurableLog:
    """Appends records to `directory/<prefix>-<start>.jsonl.open`, rotated into closed `.jsonl` files."""

    def __init__(self, directory: Path, prefix: str, *, max_bytes: int = 64 * 2**20, max_age_s: float = 3600):
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError(f"{prefix} log: max_bytes and max_age_s must be > 0, got {max_bytes} and {max_age_s}")
        self.directory, self.prefix = Path(directory), prefix
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._pending: queue.Queue[tuple[bytes, Future] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0  # monotonic time the open file was started
        self._size = 0

    def closed_files(self) -> list[Path]:
        """The closed (immutable) files, oldest first: what a reader ingests."""
        return sorted(self.directory.glob(f"{self.prefix}-*{CLOSED_SUFFIX}"))

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for left in sorted(self.directory.glob(f"{self.prefix}-*{OPEN_SUFFIX}")):
            _close_file(left)  # a killed server's: its synced records are all there
        self._writer = threading.Thread(target=self._write_loop, name=f"{self.prefix}-log", daemon=True)
        self._writer.start()

    def append(self, record: dict[str, Any]) -> Future:
        """Queue `record`; the future resolves (None) once it is on disk, or fails with the OSError."""
        if self._writer is None:
            raise RuntimeError(f"the {self.prefix} log in {self.directory} is not open: call open() first")
        done: Future = Future()
        self._pending.put(((json.dumps(record, ensure_ascii=False) + "\n").encode(), done))
        return done

    def close(self) -> None:
        """Commit what is queued, close the open file (rename it to `.jsonl`) and stop the writer."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
            self._writer = None

    # -- the writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            age_left = self.max_age_s - (time.monotonic() - self._opened) if self._fd is not None else None
            try:
                item = self._pending.get(timeout=None if age_left is None else max(age_left, 0))
            except queue.Empty:
                self._rotate()  # due by age, though no record came: a reader should not wait for traffic
                continue
            batch = [item]
            while True:  # group commit: whatever else is waiting goes in the same write and sync
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            records = [entry for entry in batch if entry is not None]
            if records:
                self._commit(records)
            if None in batch:
                self._rotate()
                return

    def _commit(self, records: list[tuple[bytes, Future]]) -> None:
        data = b"".join(line for line, _ in records)
        try:
            if self._fd is not None and (self._size + len(data) > self.max_bytes
                                         or time.monotonic() - self._opened >= self.max_age_s):
                self._rotate()
            if self._fd is None:
                self._start_file()
            os.write(self._fd, data)  # O_APPEND: one write, so records are never interleaved
            os.fsync(self._fd)
            self._size += len(data)
        except OSError as exc:
            for _, done in records:
                done.set_exception(OSError(exc.errno, f"could not write the {self.prefix} log in "
                                                      f"{self.directory}: {exc.strerror}; free disk space or fix "
                                                      "its permissions"))
            return
        for _, done in records:
            done.set_result(None)

    def _start_file(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self._path = self.directory / f"{self.prefix}-{stamp}{OPEN_SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fsync_path(self.directory)  # the new name itself survives a crash
        self._opened, self._size = time.monotonic(), 0

    def _rotate(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        _close_file(self._path)


def _close_file(path: Path) -> Path:
    """Make an open log file closed: cut a torn last line, sync, rename to `.jsonl`."""
    with path.open("r+b") as file:
        data = file.read()
        whole = data.rfind(b"\n") + 1  # a line without its newline was never synced, never acknowledged
        if whole < len(data):
            file.truncate(whole)
        file.flush()
        os.fsync(file.fileno())
    closed = path.with_name(path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
    path.rename(closed)
    fsync_path(path.parent)
    return closed



class LogRecordError(ValueError):
    """A line of a closed log file, or a whole line of an open one, that is not a JSON object."""


def read_log(directory: Path, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every record of the `prefix` log in `directory` so far, oldest file first, with where it is
    (`file:line`). An open file is read up to its last newline: a torn last line was never
    acknowledged. A line that is not a JSON object raises LogRecordError naming it."""
    paths = (p for p in sorted(Path(directory).glob(f"{prefix}-*{CLOSED_SUFFIX}*"))
             if p.name.endswith((CLOSED_SUFFIX, OPEN_SUFFIX)))
    for path in paths:
        data = path.read_bytes()
        if path.name.endswith(OPEN_SUFFIX):
            data = data[:data.rfind(b"\n") + 1]
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, problem = None, exc.msg
            else:
                problem = f"a JSON {type(record).__name__}, not an object"
            if not isinstance(record, dict):
                raise LogRecordError(f"{path}:{number}: not a log record ({problem}); the server writes one JSON "
                                     "object per line: move the file out of the log directory or repair the line")
            yield f"{path.name}:{number}", record
