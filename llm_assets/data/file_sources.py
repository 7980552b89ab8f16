"""File sources: local globs and S3 prefixes holding JSONL, parquet, plain text or HTML.

Every file is one shard; a JSONL or text file larger than ``chunk_mb`` is one shard per chunk.
A chunk is a byte range, and a line belongs to the chunk in which its first byte lies, so chunks
can be read independently, each in bounded memory.

Bad input never crashes a step silently and never loses data quietly:
- undecodable bytes are repaired to U+FFFD or the document is dropped (``invalid_utf8``), counted;
- binary files (NUL bytes) and empty files are skipped, counted and named;
- a malformed JSONL line or parquet row either stops the step with ``file:line`` and the remedy,
  or is kept aside in ``quarantine.jsonl`` (``malformed_records``).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow.parquet as pq

from llm_assets.data.documents import Document, ReadStats, ShardItem, ShardSpec, SourceError, split_lines
from llm_assets.manifest import IngestRecipe, LocalSource, S3Source

FORMATS_BY_SUFFIX = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
    ".txt": "text", ".md": "text", ".text": "text", ".html": "html", ".htm": "html",
}
_CHUNKABLE = {"jsonl", "text"}
_SNIFF_BYTES = 8192
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._/@=+-]")

FileSource = LocalSource | S3Source


def file_format(source: FileSource, relpath: str) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(relpath).suffix.lower()
    if suffix not in FORMATS_BY_SUFFIX:
        raise SourceError(
            f"source {source.name!r}: cannot tell the format of {relpath!r} from its extension; "
            f"set format: (one of jsonl, parquet, text, html) on the source in the manifest"
        )
    return FORMATS_BY_SUFFIX[suffix]


# -- listing -------------------------------------------------------------------------------
def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: relative paths start there."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    base = Path(*fixed) if fixed else Path(".")
    return base if base.is_dir() else base.parent


def _list_local(source: LocalSource) -> list[ShardItem]:
    items: dict[str, ShardItem] = {}
    for pattern in source.paths:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            what = "matches no files" if glob.has_magic(pattern) else (
                "is a folder, not a file (add a glob such as /*.jsonl)" if os.path.isdir(pattern) else "does not exist")
            raise SourceError(
                f"source {source.name!r}: {pattern!r} {what}; check sources[].paths in "
                "the manifest (relative paths start at the manifest's folder)"
            )
        base = _glob_base(pattern)
        for path in matches:
            stat = os.stat(path)
            relpath = Path(path).resolve().relative_to(base.resolve()).as_posix()
            items.setdefault(path, ShardItem(relpath, path, stat.st_size, str(stat.st_mtime_ns)))
    return sorted(items.values(), key=lambda i: i.relpath)


def s3_client(source: S3Source) -> Any:
    """A client through dagster-aws's S3Resource; without an endpoint of its own, a source uses
    the artifact store's ($LLM_ASSETS_S3_ENDPOINT_URL), so one S3-compatible server serves both."""
    from dagster_aws.s3 import S3Resource

    endpoint = source.endpoint_url or os.environ.get("LLM_ASSETS_S3_ENDPOINT_URL") or None
    return S3Resource(endpoint_url=endpoint).get_client()


def _bucket_prefix(source: S3Source) -> tuple[str, str]:
    parsed = urlparse(source.uri)
    prefix = parsed.path.lstrip("/")
    return parsed.netloc, (prefix.rstrip("/") + "/") if prefix else ""


def _list_s3(source: S3Source, client: Any) -> list[ShardItem]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _bucket_prefix(source)
    items = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relpath = obj["Key"][len(prefix):]
                if relpath and not relpath.endswith("/") and fnmatch.fnmatch(relpath, source.pattern):
                    items.append(ShardItem(relpath, obj["Key"], obj["Size"], obj["ETag"].strip('"')))
    except client.exceptions.NoSuchBucket:
        raise SourceError(f"source {source.name!r}: bucket of {source.uri} does not exist") from None
    except (BotoCoreError, ClientError) as exc:  # unreachable endpoint, denied access, bad credentials
        raise SourceError(f"source {source.name!r}: cannot list {source.uri}: {exc}") from None
    if not items:
        raise SourceError(
            f"source {source.name!r}: no object under {source.uri} matches {source.pattern!r}; "
            "check the source's uri and pattern in the manifest"
        )
    return sorted(items, key=lambda i: i.relpath)


def _shard_key(source: str, relpath: str, chunk: int | None) -> str:
    key = _UNSAFE_KEY_CHARS.sub("_", f"{source}-{relpath}").replace("...", "_")
    return key if chunk is None else f"{key}@{chunk:04d}"


def discover(source: FileSource, recipe: IngestRecipe, client: Any = None) -> list[ShardSpec]:
    items = _list_local(source) if source.kind == "local" else _list_s3(source, client or s3_client(source))
    chunk = int(recipe.chunk_mb * 1e6)
    shards = []
    for item in items:
        if file_format(source, item.relpath) in _CHUNKABLE and item.size > chunk:
            for n, start in enumerate(range(0, item.size, chunk)):
                piece = ShardItem(item.relpath, item.location, item.size, item.version,
                                  start, min(start + chunk, item.size))
                shards.append(ShardSpec(_shard_key(source.name, item.relpath, n), source.name, (piece,)))
        else:
            shards.append(ShardSpec(_shard_key(source.name, item.relpath, None), source.name, (item,)))
    return shards


# -- reading -------------------------------------------------------------------------------
def _open(source: FileSource, item: ShardItem, start: int, client: Any) -> IO[bytes]:
    if source.kind == "local":
        handle = open(item.location, "rb")
        handle.seek(start)
        return handle
    bucket, _ = _bucket_prefix(source)
    body = client.get_object(Bucket=bucket, Key=item.location, Range=f"bytes={start}-")["Body"]
    return body._raw_stream if hasattr(body, "_raw_stream") else body


def _lines(source: FileSource, item: ShardItem, client: Any) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) for each line whose first byte lies in the item's range."""
    end = item.end if item.end is not None else item.size
    begin = max(item.start - 1, 0)
    with _open(source, item, begin, client) as stream:
        offset = begin
        if item.start > 0:
            # The line holding byte start-1 belongs to the previous chunk (or ends exactly there).
            offset += len(stream.readline())
        while offset < end:
            line = stream.readline()
            if not line:
                break
            yield offset, line
            offset += len(line)


def _line_number(source: FileSource, item: ShardItem, offset: int, client: Any) -> int:
    """1-based line number of the line at ``offset``; only computed for error messages."""
    count = 1
    with _open(source, item, 0, client) as stream:
        remaining = offset
        while remaining > 0:
            block = stream.read(min(remaining, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _decode(raw: bytes, recipe: IngestRecipe, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.decode_errors += 1
        if recipe.invalid_utf8 == "drop":
            stats.dropped_undecodable += 1
            return None
        return raw.decode("utf-8", errors="replace")


def _is_binary(source: FileSource, item: ShardItem, client: Any) -> bool:
    with _open(source, item, 0, client) as stream:
        return b"\x00" in stream.read(_SNIFF_BYTES)


def _malformed(
    source: FileSource, item: ShardItem, where: str, reason: str, raw: str,
    recipe: IngestRecipe, stats: ReadStats,
) -> None:
    if recipe.malformed_records == "fail":
        raise SourceError(
            f"{source.name}:{item.relpath}:{where}: {reason}. Fix the record, or set "
            "stages.ingest.malformed_records: quarantine to set such records aside"
        )
    stats.quarantined.append({"file": item.relpath, "where": where, "reason": reason, "record": raw[:2000]})


def _documents(
    source: FileSource, item: ShardItem, base_id: str, text: str, kind: str, recipe: IngestRecipe, stats: ReadStats,
    uri: str,
) -> Iterator[Document]:
    pieces = split_lines(text, recipe.max_doc_bytes, stats)
    stats.split_documents += len(pieces) > 1
    for i, piece in enumerate(pieces):
        suffix = f"#part{i}" if len(pieces) > 1 else ""
        yield Document(f"{base_id}{suffix}", piece, source.name, uri + suffix, kind)


def _record_text(record: Any, source: FileSource) -> tuple[str | None, str | None, str | None]:
    """(text, id, problem) of one JSONL record."""
    if not isinstance(record, dict):
        return None, None, f"expected a JSON object, found {type(record).__name__}"
    if source.text_field not in record:
        fields = ", ".join(sorted(record)[:10]) or "none"
        return None, None, (
            f"record has no {source.text_field!r} field (fields: {fields}); set text_field on the source"
        )
    text = record[source.text_field]
    if not isinstance(text, str):
        return None, None, f"field {source.text_field!r} is {type(text).__name__}, not a string"
    doc_id = record.get(source.id_field) if source.id_field else None
    return text, None if doc_id is None else str(doc_id), None


def _read_jsonl(source, item, recipe, stats, client, uri) -> Iterator[Document]:
    for offset, raw in _lines(source, item, client):
        if not raw.strip():
            continue
        line = _decode(raw, recipe, stats)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            where = f"line {_line_number(source, item, offset, client)}"
            _malformed(source, item, where, f"not valid JSON ({exc.msg} at column {exc.colno})", line, recipe, stats)
            continue
        text, doc_id, problem = _record_text(record, source)
        if problem:
            where = f"line {_line_number(source, item, offset, client)}"
            _malformed(source, item, where, problem, line, recipe, stats)
            continue
        if _LONE_SURROGATE.search(text):  # "\ud800" escapes decode to text that is not UTF-8
            stats.decode_errors += 1
            if recipe.invalid_utf8 == "drop":
                stats.dropped_undecodable += 1
                continue
            text = _LONE_SURROGATE.sub("\ufffd", text)
        base_id = f"{source.name}:{doc_id}" if doc_id else f"{source.name}:{item.relpath}@{offset}"
        yield from _documents(source, item, base_id, text, "text", recipe, stats, f"{uri}@{offset}")


def _read_parquet(source, item, recipe, stats, client, uri) -> Iterator[Document]:
    with tempfile.TemporaryDirectory() as tmp:
        path = item.location
        if source.kind == "s3":
            path = os.path.join(tmp, "object.parquet")
            client.download_file(_bucket_prefix(source)[0], item.location, path)
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise SourceError(f"{source.name}:{item.relpath}: not a readable parquet file ({exc})") from None
        columns = parquet.schema_arrow.names
        if source.text_field not in columns or (source.id_field and source.id_field not in columns):
            wanted = [c for c in (source.text_field, source.id_field) if c and c not in columns]
            raise SourceError(
                f"{source.name}:{item.relpath}: no column {', '.join(map(repr, wanted))} (columns: "
                f"{', '.join(columns[:20])}); set text_field / id_field on the source"
            )
        wanted = [source.text_field] + ([source.id_field] if source.id_field else [])
        row = 0
        for batch in parquet.iter_batches(batch_size=2048, columns=wanted):
            texts = batch.column(source.text_field).to_pylist()
            ids = batch.column(source.id_field).to_pylist() if source.id_field else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if not isinstance(text, str):
                    _malformed(source, item, f"row {row}", f"{source.text_field!r} is null", "", recipe, stats)
                else:
                    base_id = (f"{source.name}:{doc_id}" if doc_id is not None
                               else f"{source.name}:{item.relpath}#row{row}")
                    yield from _documents(source, item, base_id, text, "text", recipe, stats, f"{uri}#row{row}")
                row += 1


def _read_whole(source, item, recipe, stats, client, uri, kind: str) -> Iterator[Document]:
    raw = b"".join(line for _, line in _lines(source, item, client))
    text = _decode(raw, recipe, stats)
    if text is None:
        return
    suffix = f"@{item.start}" if item.start or item.end not in (None, item.size) else ""
    yield from _documents(source, item, f"{source.name}:{item.relpath}{suffix}", text, kind, recipe, stats,
                          uri + suffix)


def read(
    shard: ShardSpec, source: FileSource, recipe: IngestRecipe, stats: ReadStats, client: Any = None
) -> Iterator[Document]:
    client = client or (s3_client(source) if source.kind == "s3" else None)
    for item in shard.items:
        stats.files += 1
        uri = f"local://{source.name}/{item.relpath}" if source.kind == "local" else (
            f"s3://{_bucket_prefix(source)[0]}/{item.location}"
        )
        if item.size == 0:
            stats.empty_files += 1
            continue
        fmt = file_format(source, item.relpath)
        if fmt != "parquet" and _is_binary(source, item, client):
            stats.binary_files.append(item.relpath)
            continue
        if fmt == "jsonl":
            yield from _read_jsonl(source, item, recipe, stats, client, uri)
        elif fmt == "parquet":
            yield from _read_parquet(source, item, recipe, stats, client, uri)
        else:
            yield from _read_whole(source, item, recipe, stats, client, uri, "html" if fmt == "html" else "text")
