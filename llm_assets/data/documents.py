"""The shapes every source produces: shard specs, documents, read statistics and errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardItem:
    """One file (or a byte range of one) behind a shard."""

    relpath: str  # stable, machine-independent name: used in ids, URIs and keys
    location: str  # where to read it: a local path or an S3 key
    size: int
    version: str  # mtime_ns locally, the ETag on S3
    start: int = 0
    end: int | None = None  # exclusive; None: to the end of the file


@dataclass(frozen=True)
class ShardSpec:
    key: str
    source: str
    items: tuple[ShardItem, ...]

    @property
    def signature(self) -> str:
        listing = [[i.relpath, i.size, i.version, i.start, i.end] for i in self.items]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def source_bytes(self) -> int:
        return sum((i.end if i.end is not None else i.size) - i.start for i in self.items)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    uri: str
    kind: str  # "code" | "docstring" | "text" | "html"


@dataclass
class ReadStats:
    files: int = 0
    decode_errors: int = 0  # documents with undecodable bytes (repaired or dropped per the recipe)
    dropped_undecodable: int = 0
    empty_files: int = 0
    binary_files: list[str] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    split_documents: int = 0  # documents cut at line boundaries for exceeding max_doc_bytes
    syntax_errors: int = 0


class SourceError(ValueError):
    """A source cannot be read as configured; the message names the source, path and remedy."""


class UnknownShardError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def split_lines(text: str, max_bytes: int) -> list[str]:
    """Cut an oversized document at line boundaries into pieces of at most ``max_bytes``."""
    if len(text.encode()) <= max_bytes:
        return [text]
    parts, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if current and size + n > max_bytes:
            parts.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        parts.append("".join(current))
    return parts
