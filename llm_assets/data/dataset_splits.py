"""dataset_splits: train/val/test by hash, and the contamination gate that guards training.

The artifact holds ``train/<shard>.parquet`` (one per corpus shard, so later stages can still
work shard by shard), ``val.parquet``, ``test.parquet`` and ``contamination.json``: the n-gram
overlap of the training split with the held-out splits and with every evaluation set the
manifest names.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.scope import artifacts_under_check
from llm_assets.data.contamination import measure_contamination
from llm_assets.data.documents import SourceError
from llm_assets.data.raw_corpus import SHARD_FILE
from llm_assets.data.splits import assign_splits
from llm_assets.manifest import EvalSetSpec
from llm_assets.store import ArtifactStore, hash_file
from llm_assets.tables import table
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

CONTAMINATION_FILE = "contamination.json"
HELD_OUT = ("val", "test")
# The contamination table in the UI: a row per held-out split and per evaluation set.
CONTAMINATION_COLUMNS = [
    ("eval_set", "string"), ("documents", "int"),
    ("contaminated", "int", "documents whose n-grams are found in the training split at doc_overlap or more"),
    ("fraction", "float", "contaminated / documents"),
    ("mean_overlap", "float", "mean fraction of a document's n-grams found in the training split"),
]
# A row per contaminated eval document (at most 20 per set), with the training documents holding its n-grams.
CONTAMINATED_DOCUMENT_COLUMNS = [
    ("eval_set", "string"), ("document", "string"),
    ("overlap", "float", "fraction of the document's n-grams found in the training split"),
    ("training_documents", "string", "ids of the training documents holding them, most first"),
]


def train_path(shard: str) -> str:
    return f"train/{quote(shard, safe='')}.parquet"


def read_eval_set(spec: EvalSetSpec) -> tuple[list[str], list[str]]:
    """(ids, texts) of a JSONL evaluation set; errors name the file and line."""
    ids, texts = [], []
    try:
        lines = Path(spec.path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SourceError(
            f"eval set {spec.name!r}: {spec.path} does not exist; fix stages.contamination.eval_sets"
        ) from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"eval set {spec.name!r}: {spec.path} is not UTF-8 (byte {exc.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[spec.text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceError(
                f"eval set {spec.name!r}: {spec.path}:{number}: expected a JSON object with a "
                f"{spec.text_field!r} string ({type(exc).__name__}: {exc})"
            ) from None
        ids.append(f"{spec.name}:{number}")
        texts.append(str(text))
    return ids, texts


def file_digest(path: str) -> str:
    try:
        return hash_file(Path(path))[0]
    except FileNotFoundError:
        return "missing"


def train_batches(root: Path) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) of the training split of a dataset_splits directory, shard by shard."""
    for path in sorted((root / "train").glob("*.parquet")):
        frame = pl.read_parquet(path, columns=["id", "text"])
        yield frame["id"].to_list(), frame["text"].to_list()


def build_splits(store: ArtifactStore, shards: dict[str, ArtifactHandle], manifest, out: Path) -> dict:
    recipe, contamination = manifest.stages.splits, manifest.stages.contamination
    (out / "train").mkdir()
    held_out: dict[str, list[pl.DataFrame]] = {name: [] for name in HELD_OUT}
    counts = {"train": 0, "val": 0, "test": 0}
    order = sorted(shards)
    for shard in order:
        frame = assign_splits(pl.read_parquet(store.local_dir(shards[shard].sha256) / SHARD_FILE), recipe)
        for split in counts:
            part = frame.filter(pl.col("split") == split).drop("split")
            counts[split] += part.height
            if split == "train":
                part.write_parquet(out / train_path(shard), compression="zstd")
            else:
                held_out[split].append(part)
    schema = pl.read_parquet_schema(out / train_path(order[0]))
    frames = {name: pl.concat(parts) if parts else pl.DataFrame(schema=schema) for name, parts in held_out.items()}
    dropped: dict[str, list[str]] = {name: [] for name in HELD_OUT}
    if contamination.contaminated_held_out == "drop":
        held = {name: (f["id"].to_list(), f["text"].to_list()) for name, f in frames.items()}
        for report in measure_contamination(train_batches(out), held, contamination):
            dropped[report.name] = report.contaminated_ids
            frames[report.name] = frames[report.name].filter(~pl.col("id").is_in(report.contaminated_ids))
            counts[report.name] -= len(report.contaminated_ids)
    eval_sets = {}
    for name, frame in frames.items():
        frame.write_parquet(out / f"{name}.parquet", compression="zstd")
        eval_sets[name] = (frame["id"].to_list(), frame["text"].to_list())
    for spec in contamination.eval_sets:
        eval_sets[spec.name] = read_eval_set(spec)
    reports = measure_contamination(train_batches(out), eval_sets, contamination)
    (out / CONTAMINATION_FILE).write_text(json.dumps([r.as_dict() for r in reports], indent=1, sort_keys=True))
    rows = [{"eval_set": r.name, "documents": r.documents, "contaminated": r.contaminated,
             "fraction": round(r.contaminated_fraction, 4), "mean_overlap": round(r.mean_overlap, 4)}
            for r in reports]
    return {
        **{f"{split}_documents": n for split, n in counts.items()},
        # Held-out documents that overlapped train (contaminated_held_out: drop): out of their split.
        **{f"{name}_dropped_as_contaminated": dg.MetadataValue.json(ids) for name, ids in dropped.items()},
        "contamination": table(rows, CONTAMINATION_COLUMNS),
    }


@artifact_asset(
    code_version="3",
    kinds={"polars", "parquet"},
    group_name="data",
    description="Deduplicated corpus split into train (per shard) / val / test by hash, with a contamination report.",
)
def dataset_splits(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    dedup_corpus: dict[str, ArtifactHandle],
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    manifest = pipeline.load()
    stages = manifest.stages
    config = {
        "splits": stages.splits,
        "contamination": stages.contamination.fingerprint_config(),
        "eval_set_digests": {s.name: file_digest(s.path) for s in stages.contamination.eval_sets},
    }
    return materialize_artifact(
        context, store, kind="dataset_splits", config=config, inputs={"dedup_corpus": dedup_corpus},
        build=lambda out: build_splits(store, dedup_corpus, manifest, out),
    )


def _split_files(root: Path) -> list[Path]:
    return sorted((root / "train").glob("*.parquet")) + [root / f"{name}.parquet" for name in HELD_OUT]


def contamination_result(reports: list[dict], limit: float, what: str) -> dg.AssetCheckResult:
    """The verdict of a contamination gate on ``reports`` (EvalSetReport.as_dict()): it fails when an
    eval set's contaminated fraction exceeds ``limit``, or when there is no report to judge.
    ``what`` names the eval sets in the description when every set passes."""
    over = [r for r in reports if r["contaminated_fraction"] > limit]
    worst = max(reports, key=lambda r: r["contaminated_fraction"], default=None)
    rows = [{"eval_set": r["name"], "document": d["id"], "overlap": d["overlap"],
             "training_documents": ", ".join(d["training_documents"])}
            for r in reports for d in r["contaminated_documents"]]
    return dg.AssetCheckResult(
        passed=bool(reports) and not over,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            "; ".join(
                f"{r['name']}: {r['contaminated']}/{r['documents']} documents contaminated "
                f"({r['contaminated_fraction']:.4f} > {limit}); e.g. "
                + ", ".join(f"{d['id']} in training documents {d['training_documents'][:3]}"
                            for d in r["contaminated_documents"][:3])
                for r in over
            ) or (f"{what}: every eval set within {limit}" if reports else f"{what}: no report to judge")
        ),
        metadata={
            "max_contaminated_fraction": limit,
            "worst_eval_set": worst["name"] if worst else "",
            "worst_fraction": worst["contaminated_fraction"] if worst else 0.0,
            "eval_sets": table(
                [{"eval_set": r["name"], "documents": r["documents"], "contaminated": r["contaminated"],
                  "fraction": round(r["contaminated_fraction"], 4), "mean_overlap": round(r["mean_overlap"], 4)}
                 for r in reports], CONTAMINATION_COLUMNS),
            "contaminated_documents": table(rows, CONTAMINATED_DOCUMENT_COLUMNS),
        },
    )


@dg.asset_check(
    asset=dataset_splits,
    blocking=True,
    description="n-gram overlap of train with the held-out splits and the manifest's eval sets stays within the gate.",
)
def contamination_gate(
    context: dg.AssetCheckExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource
) -> dg.AssetCheckResult:
    store = artifact_store.get_store()
    limit = pipeline.load().stages.contamination.max_contaminated_fraction
    reports = []
    for handle, _ in artifacts_under_check(context, dataset_splits.key, False, store):
        reports = json.loads((store.local_dir(handle.sha256) / CONTAMINATION_FILE).read_text())
    return contamination_result(reports, limit, "held-out splits and manifest eval sets")


@dg.asset_check(
    asset=dataset_splits,
    blocking=True,
    description="No document id and no exact text appears twice across train, val and test.",
)
def no_duplicates_across_splits(
    context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource
) -> dg.AssetCheckResult:
    store = artifact_store.get_store()
    frames = []
    for handle, _ in artifacts_under_check(context, dataset_splits.key, False, store):
        root = store.local_dir(handle.sha256)
        frames = [
            pl.read_parquet(p, columns=["id", "sha256"]).with_columns(pl.lit(p.stem).alias("file"))
            for p in _split_files(root)
        ]
    every = pl.concat(frames) if frames else pl.DataFrame()
    dup_ids = every.filter(pl.col("id").is_duplicated()) if frames else every
    dup_texts = every.filter(pl.col("sha256").is_duplicated()) if frames else every
    return dg.AssetCheckResult(
        passed=bool(frames) and dup_ids.is_empty() and dup_texts.is_empty(),
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{dup_ids.height} rows share an id, {dup_texts.height} share a text; e.g. "
            f"{dup_ids['id'].head(3).to_list() + dup_texts['id'].head(3).to_list()}"
            if frames and not (dup_ids.is_empty() and dup_texts.is_empty()) else "all ids and texts unique"
        ),
        metadata={"documents": every.height, "duplicate_ids": dup_ids.height, "duplicate_texts": dup_texts.height},
    )
