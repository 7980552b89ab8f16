"""raw_corpus: one parquet shard of documents per partition, straight from a source."""


import hashlib
from pathlib import Path

import dagster as dg
import polars as pl

from llm_assets.artifacts import materialize_artifact
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.sources import ReadStats, find_shard, read_shard
from llm_assets.manifest import PipelineManifest, PipelineResource
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle

SHARD_FILE = "shard.parquet"
RAW_SCHEMA = {
    "id": pl.String,
    "text": pl.String,
    "source": pl.String,
    "uri": pl.String,
    "kind": pl.String,
    "sha256": pl.String,
}


def build_raw_shard(manifest: PipelineManifest, shard_key: str, out_dir: Path) -> dict:
    """Read one shard from its source and write it as parquet; returns its statistics."""
    shard = find_shard(manifest, shard_key)
    stats = ReadStats()
    rows = [
        (d.id, d.text, d.source, d.uri, d.kind, hashlib.sha256(d.text.encode()).hexdigest())
        for d in read_shard(manifest, shard, stats)
    ]
    frame = pl.DataFrame(rows, schema=RAW_SCHEMA, orient="row")
    frame.write_parquet(out_dir / SHARD_FILE, compression="zstd", statistics=True)
    kinds = frame.group_by("kind").len().sort("kind")
    return {
        "documents": frame.height,
        "source_files": stats.files,
        "source_bytes": shard.source_bytes,
        "text_chars": int(frame["text"].str.len_chars().sum() or 0),
        "decode_errors": stats.decode_errors,
        "syntax_errors": stats.syntax_errors,
        "documents_by_kind": dg.MetadataValue.json(dict(zip(kinds["kind"], kinds["len"]))),
    }


@dg.asset(
    partitions_def=corpus_shards,
    code_version="1",
    io_manager_key="artifact_io",
    kinds={"polars", "parquet"},
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
