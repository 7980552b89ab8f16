"""raw_corpus: one parquet shard of documents per partition, straight from a source."""


import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.scope import artifacts_under_check
from llm_assets.data.documents import Document, ReadStats
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.sources import find_shard, read_shard
from llm_assets.manifest import PipelineManifest
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

SHARD_FILE = "shard.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
RAW_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "text", "source", "uri", "kind", "sha256")])
_BATCH = 2048


def _batches(documents: Iterator[Document]) -> Iterator[pa.RecordBatch]:
    rows: list[Document] = []
    for doc in documents:
        rows.append(doc)
        if len(rows) == _BATCH:
            yield _to_batch(rows)
            rows = []
    if rows:
        yield _to_batch(rows)


def _to_batch(rows: list[Document]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "id": [d.id for d in rows],
            "text": [d.text for d in rows],
            "source": [d.source for d in rows],
            "uri": [d.uri for d in rows],
            "kind": [d.kind for d in rows],
            "sha256": [hashlib.sha256(d.text.encode()).hexdigest() for d in rows],
        },
        schema=RAW_SCHEMA,
    )


def build_raw_shard(manifest: PipelineManifest, shard_key: str, out_dir: Path) -> dict:
    """Stream one shard from its source into parquet, batch by batch; returns its statistics."""
    shard = find_shard(manifest, shard_key)
    stats = ReadStats()
    documents = text_chars = 0
    counts: dict[str, int] = {}
    with pq.ParquetWriter(out_dir / SHARD_FILE, RAW_SCHEMA, compression="zstd") as writer:
        for batch in _batches(read_shard(manifest, shard, stats)):
            writer.write_batch(batch)
            documents += batch.num_rows
            text_chars += sum(len(t) for t in batch.column("text").to_pylist())
            for kind in batch.column("kind").to_pylist():
                counts[kind] = counts.get(kind, 0) + 1
    if stats.quarantined:
        with open(out_dir / QUARANTINE_FILE, "w", encoding="utf-8") as handle:
            for record in stats.quarantined:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {
        "documents": documents,
        "source_files": stats.files,
        "source_bytes": shard.source_bytes,
        "text_chars": text_chars,
        "decode_errors": stats.decode_errors,
        "dropped_undecodable": stats.dropped_undecodable,
        "empty_files": stats.empty_files,
        "binary_files_skipped": dg.MetadataValue.json(stats.binary_files),
        "quarantined_records": len(stats.quarantined),
        "split_documents": stats.split_documents,
        "long_lines_split": stats.long_lines_split,
        "syntax_errors": stats.syntax_errors,
        "documents_by_kind": dg.MetadataValue.json(dict(sorted(counts.items()))),
    }


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="1",
    kinds={"python", "parquet"},
    group_name="data",
    description="Raw documents of one corpus shard (id, text, source, uri, kind, sha256), as read from its source.",
)
def raw_corpus(
    context: dg.AssetExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource
) -> dg.Output[ArtifactHandle]:
    manifest = pipeline.load()
    shard = find_shard(manifest, context.partition_key)
    source = next(s for s in manifest.sources if s.name == shard.source)
    return materialize_artifact(
        context,
        artifact_store.get_store(),
        kind="parquet_shard",
        # The shard's file signature stands in for the external input: a changed file is a new fingerprint.
        config={"source": source, "ingest": manifest.stages.ingest, "files": shard.signature},
        build=lambda out: build_raw_shard(manifest, context.partition_key, out),
    )


@dg.asset_check(
    asset=raw_corpus,
    blocking=True,
    partitions_def=corpus_shards,
    description="The shard has the raw schema (blocking) and at least one document (warns); decode errors are counted.",
)
def raw_schema_and_content(
    context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource
) -> dg.AssetCheckResult:
    store = artifact_store.get_store()
    problems, empty, documents, decode_errors = [], [], 0, 0
    for handle, mat in artifacts_under_check(context, raw_corpus.key, True, store):
        schema = pq.read_schema(store.local_dir(handle.sha256) / SHARD_FILE)
        if not schema.equals(RAW_SCHEMA):
            problems.append(f"{handle.label}: schema {schema.names} is not {RAW_SCHEMA.names}")
        n = int(mat.metadata["documents"].value)
        documents += n
        decode_errors += int(mat.metadata["decode_errors"].value)
        if n == 0:
            empty.append(handle.label)
    return dg.AssetCheckResult(
        passed=not problems and not empty,
        severity=dg.AssetCheckSeverity.ERROR if problems else dg.AssetCheckSeverity.WARN,
        description="; ".join(problems + [f"{label}: no documents" for label in empty]) or "schema ok, not empty",
        metadata={"documents": documents, "decode_errors": decode_errors},
    )
