"""The default corpus: the running Python's standard library, its sources and its docstrings.

Every module is one ``code`` document; every module, class and function docstring of at least
``min_docstring_chars`` is one ``docstring`` document. URIs are ``python-stdlib://<version>/<path>``
so the corpus is identical on every machine with the same Python.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import platform
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from llm_assets.data.documents import Document, ReadStats, ShardItem, ShardSpec, SourceError, split_lines
from llm_assets.manifest import PythonStdlibSource

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(source: PythonStdlibSource) -> list[ShardItem]:
    root = stdlib_root()
    skipped = _SKIPPED_DIRS if source.include_tests else _SKIPPED_DIRS | _TEST_DIRS
    items = []
    matched: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)  # prune, never descend
        base = Path(dirpath)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = base / name
            relpath = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(relpath, g) for g in source.exclude):
                continue
            if source.include is not None:
                hits = {g for g in source.include if fnmatch.fnmatch(relpath, g)}
                if not hits:
                    continue
                matched |= hits
            stat = path.stat()
            items.append(ShardItem(relpath, str(path), stat.st_size, str(stat.st_mtime_ns)))
    unmatched = [g for g in source.include or () if g not in matched]
    if unmatched:
        raise SourceError(
            f"source {source.name!r}: include {', '.join(map(repr, unmatched))} matches no file of the standard "
            f"library at {root}; check sources[].include (globs relative to it, e.g. 'json/*')"
        )
    return sorted(items, key=lambda i: i.relpath)


def discover(source: PythonStdlibSource) -> list[ShardSpec]:
    """Pack the files, in path order, into shards of about ``shard_mb``."""
    target = int(source.shard_mb * 1e6)
    shards: list[ShardSpec] = []
    current: list[ShardItem] = []
    size = 0

    def close() -> None:
        shards.append(ShardSpec(f"{source.name}-{len(shards):04d}", source.name, tuple(current)))

    for item in _files(source):
        if current and size + item.size > target:
            close()
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        close()
    return shards


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


def read(shard: ShardSpec, source: PythonStdlibSource, max_doc_bytes: int, stats: ReadStats) -> Iterator[Document]:
    version = platform.python_version()
    for item in shard.items:
        stats.files += 1
        text, had_errors = _decode_python(Path(item.location).read_bytes())
        stats.decode_errors += had_errors
        uri = f"python-stdlib://{version}/{item.relpath}"
        pieces = split_lines(text, max_doc_bytes, stats)
        stats.split_documents += len(pieces) > 1
        for i, piece in enumerate(pieces):
            suffix = f"#part{i}" if len(pieces) > 1 else ""
            yield Document(f"{source.name}:{item.relpath}{suffix}", piece, source.name, uri + suffix, "code")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            stats.syntax_errors += 1  # a few stdlib files are deliberately invalid (lib2to3 tests)
            continue
        for qualname, doc in _docstrings(tree):
            if len(doc) >= source.min_docstring_chars:
                anchor = qualname or "<module>"
                yield Document(f"{source.name}:{item.relpath}::{anchor}", doc, source.name, f"{uri}#{anchor}",
                               "docstring")
