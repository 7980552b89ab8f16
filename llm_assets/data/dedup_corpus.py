"""Near-duplicate removal across every shard: signatures per shard, clusters over all, filter per shard.

minhash_signatures[shard] -> dedup_clusters (all shards) -> dedup_corpus[shard]

dedup_clusters writes one keep-list per shard; dedup_corpus fingerprints only its own keep-list,
so a new or changed shard re-filters only the shards whose keep-lists actually changed.
"""

from urllib.parse import quote

import dagster as dg
import numpy as np
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact, part_digest
from llm_assets.data.clustering import cluster_sharded
from llm_assets.data.dedup import MINHASH_ALGORITHM, exact_duplicate_representatives, minhash_signatures_on
from llm_assets.data.engine import data_engine
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.raw_corpus import SHARD_FILE
from llm_assets.tables import frame_table
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

SIGNATURES_FILE = "signatures.npy"
DOCUMENTS_FILE = "documents.parquet"


def keep_list_path(shard: str) -> str:
    return f"keep/{quote(shard, safe='')}.parquet"


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="2",
    kinds={"numpy"},
    group_name="data",
    description="MinHash signatures of every cleaned document of one shard (word shingles, rensa's RMinHash).",
)
def minhash_signatures(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    clean_corpus: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    manifest = pipeline.load()
    recipe = manifest.stages.dedup

    def build(out):
        frame = pl.read_parquet(store.local_dir(clean_corpus.sha256) / SHARD_FILE, columns=["id", "sha256", "text"])
        with data_engine(manifest.compute.data) as engine:
            signatures = minhash_signatures_on(
                engine, frame["text"].to_list(), num_perm=recipe.num_perm, shingle_size=recipe.shingle_size,
                seed=manifest.seed,
            )
        np.save(out / SIGNATURES_FILE, signatures, allow_pickle=False)
        frame.select("id", "sha256").write_parquet(out / DOCUMENTS_FILE, compression="zstd")
        # Where it ran: metadata only, as the engine changes no artifact (and no fingerprint).
        return {"documents": frame.height, "num_perm": recipe.num_perm, "engine": engine.name}

    return materialize_artifact(
        context, store, kind="minhash_signatures",
        # The algorithm's version too: a rensa upgrade that changes the signatures must not reuse old ones.
        config={"recipe": recipe, "seed": manifest.seed, "minhash": MINHASH_ALGORITHM},
        inputs={"clean_corpus": clean_corpus}, build=build,
    )


@artifact_asset(
    code_version="1",
    kinds={"numpy", "polars"},
    group_name="data",
    description=(
        "Near-duplicate clusters over all shards (LSH banding + union-find) and exact-hash duplicates: "
        "a keep-list per shard."
    ),
)
def dedup_clusters(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    minhash_signatures: dict[str, ArtifactHandle],
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    manifest = pipeline.load()
    recipe, compute = manifest.stages.dedup, manifest.compute.data

    def build(out):
        shards = sorted(minhash_signatures)
        parts = [store.local_dir(minhash_signatures[s].sha256) for s in shards]
        documents = pl.concat([
            pl.read_parquet(p / DOCUMENTS_FILE).with_columns(pl.lit(s).alias("shard")) for s, p in zip(shards, parts)
        ])
        # Signatures memory-mapped and spilled into band-bucket partitions: no process holds them all.
        with store.staging_dir() as spill, data_engine(compute) as engine:
            clusters = cluster_sharded(
                [np.load(p / SIGNATURES_FILE, mmap_mode="r") for p in parts], bands=recipe.bands, rows=recipe.rows,
                threshold=recipe.threshold, max_worker_memory_mb=compute.max_worker_memory_mb, spill_dir=spill,
                engine=engine,
            )
        cluster = clusters.of(np.arange(documents.height))
        plan = clusters.plan
        first_of_hash = exact_duplicate_representatives(documents["sha256"].to_list())
        # An exact copy is labelled as such even though it also shares its cluster.
        exact = ~first_of_hash
        near = (cluster != np.arange(len(cluster))) & first_of_hash
        ids = documents["id"].to_numpy()
        table = documents.with_columns(
            pl.Series("keep", ~near & ~exact),
            # Typed: a corpus whose shards are all empty gives empty numpy arrays polars cannot type.
            pl.Series("reason", np.where(near, "near_duplicate", np.where(exact, "exact_duplicate", "")),
                      dtype=pl.String),
            pl.Series("representative", ids[cluster], dtype=pl.String),
        )
        (out / "keep").mkdir()
        for shard in shards:
            table.filter(pl.col("shard") == shard).drop("shard").write_parquet(out / keep_list_path(shard))
        sizes = np.bincount(cluster)
        by_shard = table.group_by("shard").agg(
            pl.len().alias("documents"),
            (pl.col("reason") == "near_duplicate").sum().alias("near_duplicates_removed"),
            (pl.col("reason") == "exact_duplicate").sum().alias("exact_duplicates_removed"),
            pl.col("keep").sum().alias("kept"),
        ).sort("shard").with_columns((pl.col("kept") / pl.col("documents")).round(4).alias("kept_fraction"))
        return {
            "documents": len(cluster),
            "engine": engine.name,
            "clustering_partitions": plan.partitions,
            "near_duplicates_removed": int(near.sum()),
            "exact_duplicates_removed": int(exact.sum()),
            "duplicate_clusters": int((sizes > 1).sum()),
            "largest_cluster": int(sizes.max()) if len(sizes) else 0,
            "kept_fraction": round(float((~near & ~exact).mean()) if len(cluster) else 1.0, 4),
            "by_shard": frame_table(by_shard),
        }

    return materialize_artifact(
        context, store, kind="dedup_clusters", config=recipe,
        inputs={"minhash_signatures": minhash_signatures}, build=build,
    )


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="1",
    kinds={"polars", "parquet"},
    group_name="data",
    description="One cleaned shard with near- and exact duplicates removed (one representative per cluster).",
)
def dedup_corpus(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,  # materialize_artifact prices the step with the manifest's budget
    artifact_store: ArtifactStoreResource,
    clean_corpus: ArtifactHandle,
    dedup_clusters: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    keep_path = keep_list_path(context.partition_key)
    keep_digest = part_digest(
        store, dedup_clusters, keep_path, "rematerialize dedup_clusters after minhash_signatures of this shard"
    )

    def build(out):
        frame = pl.read_parquet(store.local_dir(clean_corpus.sha256) / SHARD_FILE)
        keep = pl.read_parquet(store.local_dir(dedup_clusters.sha256) / keep_path, columns=["id", "keep"])
        # The keep-list is row-aligned with the shard it was computed from (ids need not be unique).
        if keep["id"].to_list() != frame["id"].to_list():
            raise dg.Failure(
                f"the keep-list of shard {context.partition_key!r} does not match clean_corpus "
                f"{clean_corpus.sha256[:12]}; rematerialize minhash_signatures and dedup_clusters"
            )
        kept = frame.filter(keep["keep"])
        kept.write_parquet(out / SHARD_FILE, compression="zstd")
        return {"documents_in": frame.height, "documents": kept.height, "removed": frame.height - kept.height}

    return materialize_artifact(
        context, store, kind="parquet_shard", config={"keep_list": keep_digest},
        inputs={"clean_corpus": clean_corpus}, narrowed_inputs={"dedup_clusters": dedup_clusters},
        input_files={"dedup_clusters": [keep_path]}, build=build,
    )
