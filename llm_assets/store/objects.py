"""The format of a stored object: its ``MANIFEST.json`` and the hash that names it.

An artifact is a directory of regular files. Its manifest lists every file with its own sha256
and size; the artifact's identity is the sha256 of the manifest's canonical JSON bytes. This
module also validates the names that appear in it (relative file paths, sha256 hex digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llm_assets.store.errors import ArtifactStoreError, InvalidKeyError
from llm_assets.store.fileio import hash_file

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def _validate_relative(path: str, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidKeyError(f"{what} {path!r} is empty")
    if "\\" in path or "\x00" in path:
        raise InvalidKeyError(f"{what} {path!r} contains a backslash or NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise InvalidKeyError(f"{what} {path!r} is absolute; use a relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidKeyError(f"{what} {path!r} has an empty, '.' or '..' component (path traversal)")
    return path


def validate_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an artifact, else raise."""
    return _validate_relative(path, "artifact file path")


def validate_key(key: str, what: str = "store key") -> str:
    """Return ``key`` if it is a safe store-relative key (``index/...``, ``releases/...``), else
    raise :class:`InvalidKeyError` naming it: the same rules as :func:`validate_relpath`, so a key
    can never leave the store's root (no ``..``, absolute, empty or ``.`` components, backslash, NUL)."""
    return _validate_relative(key, what)


def validate_hash(artifact_hash: str) -> str:
    if not isinstance(artifact_hash, str) or not _HASH_RE.match(artifact_hash):
        raise InvalidKeyError(f"{artifact_hash!r} is not a sha256 hex digest")
    return artifact_hash


def mismatch_problem(
    path: str, expected_sha256: str, expected_bytes: int, actual_sha256: str, actual_bytes: int
) -> str:
    """How a verifier reports a file whose bytes differ from the manifest: the file first (callers
    split on the first ':'), then the actual and the expected sha256 and size, in full."""
    return (
        f"{path}: sha256 {actual_sha256} ({actual_bytes} bytes) does not match the manifest's "
        f"{expected_sha256} ({expected_bytes} bytes)"
    )


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ArtifactManifest:
    files: tuple[FileEntry, ...]

    def canonical_bytes(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "manifest") -> ArtifactManifest:
        try:
            body = json.loads(data)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {body.get('format')!r}")
            files = tuple(
                FileEntry(validate_relpath(f["path"]), validate_hash(f["sha256"]), int(f["bytes"]))
                for f in body["files"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactStoreError(f"{origin} is not a valid artifact manifest: {exc}") from exc
        return cls(files=tuple(sorted(files, key=lambda f: f.path)))

    @classmethod
    def of_directory(cls, root: Path) -> ArtifactManifest:
        """Hash every regular file under ``root``; refuses symlinks and special files."""
        entries = []
        for path in sorted(walk_files(root)):
            rel = path.relative_to(root).as_posix()
            entries.append(FileEntry(validate_relpath(rel), *hash_file(path)))
        return cls(files=tuple(entries))


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root``; raises on a symbolic link or anything but a regular file."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise InvalidKeyError(f"{path} is a symbolic link; artifacts hold regular files only")
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                raise InvalidKeyError(f"{path} is not a regular file")
            yield path
