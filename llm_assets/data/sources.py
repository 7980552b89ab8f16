"""Corpus sources: where raw documents come from, and how they are cut into shards.

A source lists its shards (``discover``) without reading them, so the landing sensor is cheap, and
reads one shard's documents on demand (``read_shard``), streaming. Each shard carries a
signature of what is behind it (path, size, version, byte range): a changed file changes the
signature, and with it the raw_corpus fingerprint.

Shards: the standard library is packed into shards of about ``shard_mb``; file sources give one
shard per file, and files larger than ``ingest.chunk_mb`` (JSONL, text) one shard per chunk, cut
at line boundaries so a 1 GB file never has to fit in one step's memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from llm_assets.data import file_sources, stdlib_source
from llm_assets.data.documents import Document, ReadStats, ShardSpec, UnknownShardError
from llm_assets.manifest import PipelineManifest


def discover(manifest: PipelineManifest) -> list[ShardSpec]:
    """Every shard of every source the manifest names, in a deterministic order."""
    shards: list[ShardSpec] = []
    for source in manifest.sources:
        if source.kind == "python_stdlib":
            shards.extend(stdlib_source.discover(source))
        else:
            shards.extend(file_sources.discover(source, manifest.stages.ingest))
    return shards


def find_shard(manifest: PipelineManifest, key: str) -> ShardSpec:
    for shard in discover(manifest):
        if shard.key == key:
            return shard
    raise UnknownShardError(
        f"corpus shard {key!r} is not produced by any source in the manifest; it may belong to a "
        "source that was renamed or removed. Delete the partition or restore the source."
    )


def read_shard(manifest: PipelineManifest, shard: ShardSpec, stats: ReadStats) -> Iterator[Document]:
    source = next(s for s in manifest.sources if s.name == shard.source)
    recipe = manifest.stages.ingest
    if source.kind == "python_stdlib":
        yield from stdlib_source.read(shard, source, recipe.max_doc_bytes, stats)
    else:
        yield from file_sources.read(shard, source, recipe, stats)
