"""clean_corpus: one cleaned shard per raw shard, and the gates that guard it."""

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.scope import artifacts_under_check, materializations_under_check
from llm_assets.data.cleaning import clean_frame
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.pii import scan_pii_frame
from llm_assets.data.raw_corpus import SHARD_FILE
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="1",
    kinds={"polars", "parquet"},
    group_name="data",
    description="One shard after HTML-to-text, unicode normalisation, typed PII redaction and quality filters.",
)
def clean_corpus(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    raw_corpus: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    recipe = pipeline.load().stages.clean

    def build(out):
        raw = pl.read_parquet(store.local_dir(raw_corpus.sha256) / SHARD_FILE)
        cleaned, stats = clean_frame(raw, recipe)
        cleaned.write_parquet(out / SHARD_FILE, compression="zstd")
        return stats.as_metadata()

    return materialize_artifact(
        context, store, kind="parquet_shard", config=recipe.fingerprint_config(),
        inputs={"raw_corpus": raw_corpus}, build=build,
    )


@dg.asset_check(
    asset=clean_corpus,
    blocking=True,
    partitions_def=corpus_shards,
    description="Scans the cleaned shard for every PII kind; anything found blocks the shard.",
)
def residual_pii(context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
    store = artifact_store.get_store()
    found: dict[str, int] = {}
    for handle, _ in artifacts_under_check(context, clean_corpus.key, True, store):
        counts = scan_pii_frame(pl.read_parquet(store.local_dir(handle.sha256) / SHARD_FILE))
        for kind, n in counts.items():
            found[kind] = found.get(kind, 0) + n
    leaked = {k: n for k, n in found.items() if n}
    return dg.AssetCheckResult(
        passed=not leaked,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            "no PII found" if not leaked else
            f"PII left after cleaning: {leaked}; add these kinds to stages.clean.redact"
        ),
        metadata={f"residual_{kind}": n for kind, n in sorted(found.items())},
    )


@dg.asset_check(
    asset=clean_corpus,
    partitions_def=corpus_shards,
    description="The fraction of documents kept is inside the manifest's bounds (warns and alerts).",
)
def kept_fraction_in_bounds(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
    recipe = pipeline.load().stages.clean
    mats = materializations_under_check(context, clean_corpus.key, True)
    fractions = {m.partition: float(m.metadata["kept_fraction"].value) for m in mats}
    outside = {p: f for p, f in fractions.items() if not recipe.min_kept_fraction <= f <= recipe.max_kept_fraction}
    return dg.AssetCheckResult(
        passed=bool(fractions) and not outside,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"kept fraction {', '.join(f'{f:.3f}' for f in fractions.values())} outside "
            f"[{recipe.min_kept_fraction}, {recipe.max_kept_fraction}]" if outside else "in bounds"
        ),
        metadata={
            "kept_fraction": min(fractions.values(), default=0.0),
            "min_kept_fraction": recipe.min_kept_fraction,
            "max_kept_fraction": recipe.max_kept_fraction,
        },
    )
