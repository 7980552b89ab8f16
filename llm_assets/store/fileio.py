"""Durable local file primitives: hashing a file's bytes, fsync, atomic replacement, and the
staging folders of writers (kept fresh while their writer lives, swept once it is long gone).

The one implementation of each, shared by the artifact store and the training checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes read (or streamed) at a time when hashing or copying a file."""


def hash_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest of the file at ``path`` and its size in bytes, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries are durable only once it is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader sees the old bytes or the new, never part.

    The bytes go to a hidden temporary file beside ``path``, are fsynced, then renamed over it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


STAGING_HEARTBEAT_SECONDS = 30.0
"""How often a live writer touches its staging folder; a sweep's age must be well above it."""


@contextlib.contextmanager
def kept_fresh(path: Path, interval: float = STAGING_HEARTBEAT_SECONDS) -> Iterator[Path]:
    """Touch ``path`` (its mtime) every ``interval`` seconds while the block runs.

    A staging folder's own mtime only changes when entries are added to it directly; a long build
    writing deep inside it, or copying one huge file, would look abandoned. This heartbeat is what
    tells :func:`remove_stale_children` that the writer is alive: a killed writer stops touching.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                os.utime(path)
            except OSError:
                return  # the folder is gone (committed or removed): nothing left to keep fresh

    thread = threading.Thread(target=beat, name=f"staging-heartbeat {path.name}", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def build_folder(root: Path) -> Iterator[Path]:
    """A fresh folder under ``root`` for a step to build an artifact in, kept fresh while the block
    runs and removed after it (what it held is committed by then, or abandoned)."""
    path = root / f"build-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        with kept_fresh(path):
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and, for a real directory, of everything under it (lstat)."""
    newest = path.lstat().st_mtime
    if stat.S_ISDIR(path.lstat().st_mode):
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            for name in [*dirnames, *filenames]:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def remove_stale_children(root: Path, max_age_seconds: float, now: float | None = None) -> list[str]:
    """Remove every entry of ``root`` whose newest mtime (its own or anything under it) is more than
    ``max_age_seconds`` old; return the paths removed. ``root`` holds staging folders only: a live
    writer's folder is younger than that (see :func:`kept_fresh`), a killed writer's is debris."""
    if max_age_seconds < 0:
        raise ValueError(f"max_age_seconds must not be negative, got {max_age_seconds}")
    now = time.time() if now is None else now
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        try:
            if now - _newest_mtime(entry) <= max_age_seconds:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # another sweeper got there first
        except OSError as exc:
            logger.warning("could not remove stale staging folder %s: %s", entry, exc)
            continue
        removed.append(str(entry))
    return removed
