"""corpus_inventory: what the corpus holds, shard by shard, in one table."""


from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.data.raw_corpus import SHARD_FILE
from llm_assets.store import ArtifactStore
from llm_assets.tables import frame_table
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

INVENTORY_FILE = "inventory.parquet"


def shard_profile(shard: str, frame: pl.DataFrame) -> dict:
    lengths = frame["text"].str.len_chars()
    return {
        "shard": shard,
        "documents": frame.height,
        "code_documents": int((frame["kind"] == "code").sum()),
        "docstring_documents": int((frame["kind"] == "docstring").sum()),
        "text_chars": int(lengths.sum() or 0),
        "median_chars": int(lengths.median() or 0),
        "max_chars": int(lengths.max() or 0),
        "distinct_texts": frame["sha256"].n_unique(),
    }


def build_inventory(store: ArtifactStore, shards: Mapping[str, ArtifactHandle], out_dir: Path) -> dict:
    profiles = [
        shard_profile(key, pl.read_parquet(store.local_dir(handle.sha256) / SHARD_FILE))
        for key, handle in sorted(shards.items())
    ]
    table = pl.DataFrame(profiles)
    table.write_parquet(out_dir / INVENTORY_FILE, compression="zstd")
    totals = table.select(pl.col("documents", "code_documents", "docstring_documents", "text_chars").sum())
    return {
        "shards": table.height,
        "documents": int(totals["documents"][0]),
        "docstring_documents": int(totals["docstring_documents"][0]),
        "text_mb": round(totals["text_chars"][0] / 1e6, 3),
        "by_shard": frame_table(table),
    }


@artifact_asset(
    code_version="1",
    kinds={"polars", "parquet"},
    group_name="data",
    description="Per-shard profile of the raw corpus (documents, kinds, lengths, distinct texts) and its totals.",
)
def corpus_inventory(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    raw_corpus: dict[str, ArtifactHandle],
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    return materialize_artifact(
        context,
        store,
        kind="parquet_table",
        inputs={"raw_corpus": raw_corpus},
        build=lambda out: build_inventory(store, raw_corpus, out),
    )
