"""The shapes every source produces: shard specs, documents, read statistics and errors."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
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
    long_lines_split: int = 0  # single lines longer than max_doc_bytes, cut inside the line
    syntax_errors: int = 0


class SourceError(ValueError):
    """A source cannot be read as configured; the message names the source, path and remedy."""


class UnknownShardError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# The line boundaries of str.splitlines, as a pattern that yields lines one at a time (keepends).
_LINE = re.compile(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]*(?:\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029])?")
_MEASURE_CHARS = 1 << 20  # UTF-8 sizes of long texts are measured this many characters at a time


def utf8_size(text: str) -> int:
    """len(text.encode()) without encoding a long text whole."""
    if text.isascii():
        return len(text)
    return sum(len(text[i:i + _MEASURE_CHARS].encode()) for i in range(0, len(text), _MEASURE_CHARS))


def _lines(text: str) -> Iterator[str]:
    """text.splitlines(keepends=True), one line at a time."""
    for match in _LINE.finditer(text):
        if match.end() > match.start():
            yield match.group()


def _cut_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cut one line longer than ``max_bytes`` into pieces of at most ``max_bytes``: after the last
    space or tab in the second half of each window, else at the byte limit, on a character boundary.
    Each window is encoded on its own, so memory follows ``max_bytes``, not the line."""
    start = 0
    while start < len(line):
        window = line[start:start + max_bytes]  # at least max_bytes bytes, unless the line ends first
        if window.isascii():
            take = len(window)
        else:
            encoded = window.encode()
            if len(encoded) <= max_bytes:
                take = len(window)
            else:
                cut = max_bytes
                while encoded[cut] & 0xC0 == 0x80:  # a continuation byte: step back to a character's start
                    cut -= 1
                take = max(len(encoded[:cut].decode()), 1)  # one character wider than max_bytes goes whole
        if start + take < len(line):
            space = max(window.rfind(" ", take // 2, take), window.rfind("\t", take // 2, take))
            if space >= 0:
                take = space + 1
        yield line[start:start + take]
        start += take


def split_lines(text: str, max_bytes: int, stats: ReadStats | None = None) -> list[str]:
    """Cut an oversized document at line boundaries into pieces of at most ``max_bytes``.

    A single line longer than ``max_bytes`` (a minified file, a 30 MB one-line record) is cut
    inside the line (``_cut_line``); ``stats.long_lines_split`` counts such lines. The pieces
    always join back to the text, and a text whose lines all fit is cut as it always was.
    """
    if utf8_size(text) <= max_bytes:
        return [text]
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for line in _lines(text):
        n = utf8_size(line)
        if current and size + n > max_bytes:
            parts.append("".join(current))
            current, size = [], 0
        if n > max_bytes:
            if stats is not None:
                stats.long_lines_split += 1
            *whole, rest = _cut_line(line, max_bytes)
            parts.extend(whole)
            line, n = rest, utf8_size(rest)
        current.append(line)
        size += n
    if current:
        parts.append("".join(current))
    return parts
