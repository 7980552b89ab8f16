"""Corpus sources: where raw documents come from, and how they are cut into shards.

A source lists its shards (``discover``) without reading them, so the landing sensor is cheap, and
reads one shard's documents on demand (``read_shard``). Each shard carries a signature of the
files behind it (path, size, mtime): a changed file changes the signature, and with it the
raw_corpus fingerprint.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import io
import json
import os
import platform
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_assets.manifest import PipelineManifest, PythonStdlibSource


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardSpec:
    key: str
    source: str
    files: tuple[SourceFile, ...]

    @property
    def signature(self) -> str:
        listing = [[f.relpath, f.size, f.mtime_ns] for f in self.files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def source_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    uri: str
    kind: str  # "code" | "docstring"


@dataclass
class ReadStats:
    files: int = 0
    decode_errors: int = 0
    syntax_errors: int = 0


class UnknownShardError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def _stdlib_files(source: PythonStdlibSource) -> list[SourceFile]:
    root = stdlib_root()
    skipped = _SKIPPED_DIRS if source.include_tests else _SKIPPED_DIRS | _TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)  # prune, never descend
        base = Path(dirpath)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = base / name
            relpath = path.relative_to(root).as_posix()
            if source.include is not None and not any(fnmatch.fnmatch(relpath, g) for g in source.include):
                continue
            stat = path.stat()
            files.append(SourceFile(path, relpath, stat.st_size, stat.st_mtime_ns))
    return sorted(files, key=lambda f: f.relpath)


def _pack(files: list[SourceFile], target_bytes: int, prefix: str, source: str) -> list[ShardSpec]:
    """Group files, in order, into shards of about ``target_bytes`` each."""
    shards: list[ShardSpec] = []
    current: list[SourceFile] = []
    size = 0
    for f in files:
        if current and size + f.size > target_bytes:
            shards.append(ShardSpec(f"{prefix}-{len(shards):04d}", source, tuple(current)))
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        shards.append(ShardSpec(f"{prefix}-{len(shards):04d}", source, tuple(current)))
    return shards


def discover(manifest: PipelineManifest) -> list[ShardSpec]:
    """Every shard of every source the manifest names, in a deterministic order."""
    shards: list[ShardSpec] = []
    for source in manifest.sources:
        files = _stdlib_files(source)
        shards.extend(_pack(files, int(source.shard_mb * 1e6), source.name, source.name))
    return shards


def find_shard(manifest: PipelineManifest, key: str) -> ShardSpec:
    for shard in discover(manifest):
        if shard.key == key:
            return shard
    raise UnknownShardError(
        f"corpus shard {key!r} is not produced by any source in the manifest; it may belong to a "
        "source that was renamed or removed. Delete the partition or restore the source."
    )


def _decode_python(raw: bytes) -> tuple[str, bool]:
    """Decode a Python file by its declared encoding; undecodable bytes become U+FFFD."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError:
        encoding = "utf-8"
    try:
        return raw.decode(encoding), False
    except (UnicodeDecodeError, LookupError):
        return raw.decode("utf-8", errors="replace"), True


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module and every class and function in it."""
    module_doc = ast.get_docstring(tree)
    if module_doc:
        yield "", module_doc
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                stack.append((name + ".", child))


def _split_lines(text: str, max_bytes: int) -> list[str]:
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


def read_stdlib_shard(
    shard: ShardSpec, source: PythonStdlibSource, max_doc_bytes: int, stats: ReadStats
) -> Iterator[Document]:
    version = platform.python_version()
    for f in shard.files:
        stats.files += 1
        text, had_errors = _decode_python(f.path.read_bytes())
        stats.decode_errors += had_errors
        uri = f"python-stdlib://{version}/{f.relpath}"
        pieces = _split_lines(text, max_doc_bytes)
        for i, piece in enumerate(pieces):
            suffix = f"#part{i}" if len(pieces) > 1 else ""
            yield Document(f"{source.name}:{f.relpath}{suffix}", piece, source.name, uri + suffix, "code")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            stats.syntax_errors += 1  # a few stdlib files are deliberately invalid (lib2to3 tests)
            continue
        for qualname, doc in _docstrings(tree):
            if len(doc) >= source.min_docstring_chars:
                anchor = qualname or "<module>"
                yield Document(f"{source.name}:{f.relpath}::{anchor}", doc, source.name, f"{uri}#{anchor}", "docstring")


def read_shard(manifest: PipelineManifest, shard: ShardSpec, stats: ReadStats) -> Iterator[Document]:
    source = next(s for s in manifest.sources if s.name == shard.source)
    yield from read_stdlib_shard(shard, source, manifest.stages.ingest.max_doc_bytes, stats)
