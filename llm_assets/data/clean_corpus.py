"""clean_corpus: one cleaned shard per raw shard, and the gates that guard it."""

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.scope import artifacts_under_check, materializations_under_check
from llm_assets.data.cleaning import CleanStats, clean_frame
from llm_assets.data.dedup import budget_spans
from llm_assets.data.engine import data_engine
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.raw_corpus import SHARD_FILE
from llm_assets.data.residual_pii import ResidualReport, scan_residual_pii
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="2",
    kinds={"polars", "parquet"},
    group_name="data",
    description="One shard after HTML-to-text, unicode normalisation, language identification, typed PII redaction "
                "and quality filters.",
)
def clean_corpus(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    raw_corpus: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    manifest = pipeline.load()
    recipe = manifest.stages.clean

    def build(out):
        raw = pl.read_parquet(store.local_dir(raw_corpus.sha256) / SHARD_FILE)
        # Cleaning judges each document alone: the shard cut into pieces of about equal text, one
        # per worker of the data engine, cleans to the same frame as the whole.
        with data_engine(manifest.compute.data) as engine:
            lengths = raw["text"].str.len_chars().fill_null(0).to_numpy()
            piece = max(1, -(-int(lengths.sum()) // engine.parallelism()))
            spans = budget_spans(lengths, piece)
            pieces = engine.map(clean_frame, [(raw.slice(lo, hi - lo),) for lo, hi in spans],
                                common={"recipe": recipe}) if spans else [clean_frame(raw, recipe)]
        # One chunk, as the whole frame would be: the parquet file's bytes do not depend on the engine.
        cleaned = pl.concat([frame for frame, _ in pieces], rechunk=True)
        stats = CleanStats.combine(stats for _, stats in pieces)
        cleaned.write_parquet(out / SHARD_FILE, compression="zstd")
        return {**stats.as_metadata(), "engine": engine.name}

    return materialize_artifact(
        context, store, kind="parquet_shard", config=recipe.fingerprint_config(),
        inputs={"raw_corpus": raw_corpus}, build=build,
    )


@dg.asset_check(
    asset=clean_corpus,
    blocking=True,
    partitions_def=corpus_shards,
    description="Scans the cleaned shard for every PII kind with detectors independent of the redactor's "
                "(Presidio's recognizers and others); anything found blocks the shard.",
)
def residual_pii(context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
    store = artifact_store.get_store()
    report = ResidualReport()
    for handle, _ in artifacts_under_check(context, clean_corpus.key, True, store):
        shard = pl.read_parquet(store.local_dir(handle.sha256) / SHARD_FILE, columns=["id", "text"])
        report.merge(scan_residual_pii(shard))
    leaked = report.leaked
    return dg.AssetCheckResult(
        passed=not leaked,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            "no PII found" if not leaked else
            f"PII left after cleaning: {leaked} in documents {report.documents_with(leaked)}; redact these kinds "
            "(stages.clean.redact) or, if the redactor missed them, report its blind spot"
        ),
        # Counts and document ids only: the check's metadata must not republish the PII it found.
        metadata={
            **{f"residual_{kind}": n for kind, n in sorted(report.counts.items())},
            "documents": dg.MetadataValue.json({kind: ids for kind, ids in report.documents.items() if ids}),
        },
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


@dg.asset_check(
    asset=clean_corpus,
    partitions_def=corpus_shards,
    description="Per target language, the quality filters keep at least min_language_kept_fraction of its documents "
                "(warns and alerts: the filters discriminate against a language).",
)
def language_kept_fraction(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
    recipe = pipeline.load().stages.clean
    languages_in: dict[str, int] = {}
    languages_out: dict[str, int] = {}
    for m in materializations_under_check(context, clean_corpus.key, True):
        for counts, key in ((languages_in, "languages_in"), (languages_out, "languages_out")):
            for lang, n in m.metadata[key].value.items():
                counts[lang] = counts.get(lang, 0) + n
    fractions = CleanStats(languages_in=languages_in, languages_out=languages_out).language_kept_fractions(
        recipe.languages
    )
    low = {lang: round(f, 3) for lang, f in fractions.items() if f < recipe.min_language_kept_fraction}
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"quality filters keep too little of {low} (< {recipe.min_language_kept_fraction}); loosen the "
            "stages.clean thresholds for these languages' text" if low else "every target language kept in bounds"
        ),
        metadata={
            "kept_fraction_per_language": dg.MetadataValue.json({k: round(f, 4) for k, f in fractions.items()}),
            "min_language_kept_fraction": recipe.min_language_kept_fraction,
        },
    )
