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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from llm_assets.data import file_sources, stdlib_source
from llm_assets.data.documents import Document, ReadStats, ShardSpec, SourceError, UnknownShardError
from llm_assets.manifest import PipelineManifest, Source

PRUNE_COMMAND = "llm-assets partitions prune"


@dataclass(frozen=True)
class SourceProblem:
    """A source that cannot be listed; ``message`` is one line: where it is written, what, the remedy."""

    source: str
    message: str


class SourceListingError(SourceError):
    """Sources that cannot be listed, under ``on_source_error: stop``: one line per source."""

    def __init__(self, problems: list[SourceProblem]):
        super().__init__("\n".join(p.message for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Discovery:
    shards: list[ShardSpec]
    problems: list[SourceProblem]

    @property
    def failed_sources(self) -> set[str]:
        return {p.source for p in self.problems}


def _discover_source(manifest: PipelineManifest, source: Source) -> list[ShardSpec]:
    if source.kind == "python_stdlib":
        return stdlib_source.discover(source)
    return file_sources.discover(source, manifest.stages.ingest)


def _problem(manifest: PipelineManifest, source: Source, exc: Exception) -> SourceProblem:
    what = str(exc) if isinstance(exc, SourceError) else f"source {source.name!r}: {type(exc).__name__}: {exc}"
    remedy = ("fix or remove the source; or set on_source_error: skip to ingest the other sources without it"
              if manifest.on_source_error == "stop" else "skipped (on_source_error: skip); fix or remove the source")
    return SourceProblem(source.name, f"{manifest.source_location(source.name)}: {what}; {remedy}")


def discover_sources(manifest: PipelineManifest) -> Discovery:
    """Every shard of every source that can be listed, and a problem for each source that cannot
    (a glob or prefix matching nothing, a missing path or bucket): one bad source never hides the others."""
    shards: list[ShardSpec] = []
    problems: list[SourceProblem] = []
    for source in manifest.sources:
        try:
            shards.extend(_discover_source(manifest, source))
        except (SourceError, OSError) as exc:
            problems.append(_problem(manifest, source, exc))
    return Discovery(shards, problems)


def discover(manifest: PipelineManifest) -> list[ShardSpec]:
    """Every shard of every source the manifest names, in a deterministic order. A source that
    cannot be listed raises SourceListingError under ``on_source_error: stop``; under ``skip`` it
    is left out (``discover_sources`` says which)."""
    found = discover_sources(manifest)
    if found.problems and manifest.on_source_error == "stop":
        raise SourceListingError(found.problems)
    return found.shards


def owning_sources(manifest: PipelineManifest, key: str) -> list[Source]:
    """The sources whose shard keys could include ``key``: keys start with the source's name (with
    "..." made "_" in file sources' keys) and a dash."""
    return [s for s in manifest.sources
            if key.startswith(f"{s.name}-") or key.startswith(f"{s.name.replace('...', '_')}-")]


@dataclass(frozen=True)
class StalePartition:
    key: str
    reason: str


def classify_partitions(
    manifest: PipelineManifest, found: Discovery, existing: Iterable[str]
) -> tuple[list[StalePartition], list[str]]:
    """Of the existing corpus_shards partitions, (those no source produces, those of sources that
    cannot be listed now). The latter are not stale: whether their shards exist cannot be told."""
    produced = {s.key for s in found.shards}
    stale, unlisted = [], []
    for key in sorted(existing):
        if key in produced:
            continue
        owners = sorted((s.name for s in owning_sources(manifest, key)), key=len, reverse=True)
        if any(name in found.failed_sources for name in owners):
            unlisted.append(key)
        elif owners:
            stale.append(StalePartition(key, f"source {owners[0]!r} no longer produces it (files or shards changed)"))
        else:
            stale.append(StalePartition(key, "no source in the manifest produces it (a source renamed or removed)"))
    return stale, unlisted


def find_shard(manifest: PipelineManifest, key: str) -> ShardSpec:
    """The shard behind a corpus_shards partition; only the sources that could own the key are listed,
    so a broken source elsewhere in the manifest does not stop this shard."""
    problems = []
    for source in owning_sources(manifest, key):
        try:
            shards = _discover_source(manifest, source)
        except (SourceError, OSError) as exc:
            problems.append(_problem(manifest, source, exc))
            continue
        for shard in shards:
            if shard.key == key:
                return shard
    if problems:
        raise SourceListingError(problems)
    raise UnknownShardError(
        f"corpus shard {key!r} is not produced by any source in the manifest; it may belong to a source "
        f"that was renamed or removed (or to files that are gone). Remove such partitions with "
        f"`{PRUNE_COMMAND}` (`--dry-run` lists them first), or restore the source."
    )


def read_shard(manifest: PipelineManifest, shard: ShardSpec, stats: ReadStats) -> Iterator[Document]:
    source = next(s for s in manifest.sources if s.name == shard.source)
    recipe = manifest.stages.ingest
    if source.kind == "python_stdlib":
        yield from stdlib_source.read(shard, source, recipe.max_doc_bytes, stats)
    else:
        yield from file_sources.read(shard, source, recipe, stats)
