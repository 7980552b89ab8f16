"""Durable local file primitives: hashing a file's bytes, fsync, atomic replacement.

The one implementation of each, shared by the artifact store and the training checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

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
