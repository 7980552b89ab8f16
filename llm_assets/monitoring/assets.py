"""The loop's data half: `serving_traffic` (the server's closed logs of one time window, redacted),
its sensor, `drift_report` (per model size × window) with its gates, and `feedback_dataset`, which
declarative automation materializes when new traffic fails a drift gate or brings enough feedback.
docs/monitoring.md.
"""

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.checks.scope import artifacts_under_check
from llm_assets.data.residual_pii import scan_residual_pii
from llm_assets.manifest import MonitoringRecipe, PipelineManifest
from llm_assets.monitoring import drift
from llm_assets.monitoring.conditions import after_update, retrain_condition
from llm_assets.monitoring.feedback import PREFERENCE_FILE, SFT_FILE, feedback_data
from llm_assets.monitoring.plot import figures_over_windows
from llm_assets.monitoring.traffic import (
    FEEDBACK_FILE,
    REQUESTS_FILE,
    LogFile,
    TrafficLogError,
    complete_until,
    files_signature,
    read_records,
    record_time,
    text_frame,
    window_files,
    window_frames,
)
from llm_assets.posttrain.assets import decontamination_texts
from llm_assets.release.assets import current_model
from llm_assets.release_pointer import release_history
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, input_records, latest_materializations
from resources.pipeline import PipelineResource

SIZE, WINDOW = "model_size", "window"  # drift_report's partition dimensions
DRIFT_FILE = "drift.json"
# Texts of a reference document beyond this are not counted: a whole module would outweigh the rest.
REFERENCE_DOC_CHARS = 4000


def traffic_windows(recipe: MonitoringRecipe) -> dg.TimeWindowPartitionsDefinition:
    start = datetime.strptime(recipe.start, "%Y-%m-%d")
    if recipe.partitions == "minutely":  # Dagster ships hourly and daily; a minute is a cron window
        return dg.TimeWindowPartitionsDefinition(cron_schedule="* * * * *", start=start, fmt="%Y-%m-%d-%H:%M",
                                                 timezone="UTC")
    cls = dg.HourlyPartitionsDefinition if recipe.partitions == "hourly" else dg.DailyPartitionsDefinition
    return cls(start_date=start, timezone="UTC")


def window_start(recipe: MonitoringRecipe, at: datetime) -> datetime:
    """The start of the traffic window holding `at` (UTC)."""
    minute = at.astimezone(UTC).replace(second=0, microsecond=0)
    return {"minutely": minute, "hourly": minute.replace(minute=0),
            "daily": minute.replace(minute=0, hour=0)}[recipe.partitions]


def windows_with_traffic(windows: dg.TimeWindowPartitionsDefinition, files: list[LogFile], since: datetime,
                         until: datetime) -> list[str]:
    """The windows ending by `until` (complete) and ending after `since` with a record in `files`."""
    keys = set()
    for f in files:
        for number, record in enumerate(read_records(f.path), 1):
            at = record_time(record, f"{f.path}:{number}")
            if at >= since:
                keys.add(windows.get_partition_key_for_timestamp(at.timestamp()))
    return sorted(k for k in keys if windows.time_window_for_partition_key(k).end <= until)


def reference_texts(split_dir: Path, limit: int) -> tuple[list[str], list[str]]:
    """Up to `limit` training documents and `limit` test documents of a dataset_splits artifact,
    a deterministic sample (ordered by the cleaned text's sha256), each cut to REFERENCE_DOC_CHARS."""

    def sample(frame: pl.DataFrame) -> list[str]:
        return [t[:REFERENCE_DOC_CHARS] for t in frame.sort("sha256").head(limit)["text"].to_list()]

    train = pl.concat([pl.read_parquet(p, columns=["text", "sha256"])
                       for p in sorted((split_dir / "train").glob("*.parquet"))])
    return sample(train), sample(pl.read_parquet(split_dir / "test.parquet", columns=["text", "sha256"]))


def size_traffic(requests: pl.DataFrame, feedback: pl.DataFrame, releases: set[str]) -> tuple[pl.DataFrame,
                                                                                              pl.DataFrame]:
    """The records a release of one model size served (a log may hold several sizes' traffic)."""
    return requests.filter(pl.col("release").is_in(releases)), feedback.filter(pl.col("release").is_in(releases))


def drift_reader(gate_names: list[str]):
    """What drift_gates reads off a drift_report materialization: each configured gate's figure;
    a figure that could not be measured (no feedback, no traffic for this size) is not judged."""

    def read(mat: dg.AssetMaterialization) -> Figures:
        values = {name: float(mat.metadata[name].value) for name in gate_names if name in mat.metadata}
        judged = {name: value for name, value in values.items() if math.isfinite(value)}
        skipped = sorted(set(gate_names) - set(judged))
        return Figures(values=judged, summary=f"{len(judged)} drift gate(s) hold"
                       + (f"; not measured in this window: {', '.join(skipped)}" if skipped else ""),
                       metadata={"not_measured": ", ".join(skipped)})

    return read


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    recipe = manifest.stages.monitoring
    if recipe is None or not manifest.model_sizes:
        return dg.Definitions()
    windows = traffic_windows(recipe)
    log_dir = Path(recipe.log_dir)
    by_size_and_window = dg.MultiPartitionsDefinition({
        SIZE: dg.StaticPartitionsDefinition(sorted(manifest.model_sizes)), WINDOW: windows})

    @artifact_asset(
        partitions_def=windows, code_version="1", kinds={"polars"}, group_name="serving",
        description="The server's closed request and feedback logs of one time window, texts normalised and "
                    "PII-redacted as the corpus is: requests.parquet, feedback.parquet.",
    )
    def serving_traffic(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                        artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        current = pipeline.load()
        window = context.partition_time_window
        until = complete_until(log_dir, datetime.now(UTC))
        if until < window.end:
            raise dg.Failure(
                f"serving_traffic[{context.partition_key}]: the window ends {window.end.isoformat()}, but records "
                f"from {until.isoformat()} on are still in open log files in {log_dir} (*.jsonl.open). Wait for the "
                "window to end and the server to close the file (serve's log_max_age_s), then materialize it; the "
                "serving_traffic_sensor does so by itself")
        files = window_files(log_dir, window.start, window.end)

        def build(out: Path) -> dict:
            try:
                requests, feedback = window_frames(files, window.start, window.end, current.stages.clean)
            except TrafficLogError as exc:
                raise dg.Failure(str(exc)) from None
            requests.write_parquet(out / REQUESTS_FILE)
            feedback.write_parquet(out / FEEDBACK_FILE)
            return {"requests": requests.height, "feedback": feedback.height,
                    "pii_redactions": int(requests["pii_redactions"].sum() + feedback["pii_redactions"].sum()),
                    "prompts_logged": int(requests["prompts"].is_not_null().sum()),
                    "log_files": dg.MetadataValue.json([f.path.name for f in files])}

        return materialize_artifact(context, artifact_store.get_store(), kind="serving_traffic", build=build,
                                    config={"clean": current.stages.clean, "files": files_signature(files),
                                            "window": [window.start.isoformat(), window.end.isoformat()]})

    @dg.asset_check(asset=serving_traffic, blocking=True, partitions_def=windows,
                    description="An independent PII scan of every stored text (prompts, answers, corrections) "
                                "finds nothing the redaction left.")
    def traffic_residual_pii(context: dg.AssetCheckExecutionContext,
                             artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
        store, leaked, scanned = artifact_store.get_store(), {}, 0
        for handle, _ in artifacts_under_check(context, serving_traffic.key, True, store):
            root = store.local_dir(handle.sha256)
            texts = text_frame(pl.read_parquet(root / REQUESTS_FILE), pl.read_parquet(root / FEEDBACK_FILE))
            scanned += texts.height
            report = scan_residual_pii(texts)
            leaked.update({kind: report.documents[kind][:5] for kind in report.leaked})
        return dg.AssetCheckResult(
            passed=not leaked, severity=dg.AssetCheckSeverity.ERROR, metadata={"texts_scanned": scanned},
            description=f"residual PII in {leaked}: a detector the redaction lacks; add the kind to stages.clean.redact"
            if leaked else f"{scanned} text(s) scanned, no residual PII")

    @dg.sensor(name="serving_traffic_sensor", target=[serving_traffic], minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Requests serving_traffic for each window whose log files are all closed and hold records.")
    def serving_traffic_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        # The cursor: every window ending by this time has been requested (or had no traffic).
        since = datetime.fromisoformat(context.cursor) if context.cursor else windows.start
        until = complete_until(log_dir, datetime.now(UTC))
        try:
            keys = windows_with_traffic(windows, window_files(log_dir, since, until), since, until)
        except TrafficLogError as exc:
            return dg.SensorResult(skip_reason=str(exc))
        done = window_start(recipe, until)  # the window holding `until` is not complete yet
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=key, run_key=f"serving_traffic:{key}") for key in keys],
            cursor=max(since, done).isoformat())

    @artifact_asset(
        partitions_def=by_size_and_window, code_version="1", kinds={"pytorch", "polars"}, group_name="serving",
        ins={"serving_traffic": dg.AssetIn(), "release": dg.AssetIn(), "dataset_splits": dg.AssetIn()},
        # A new release or new training data does not redo every past window: only its traffic landing.
        automation_condition=after_update(serving_traffic),
        description="Served prompts against the training data under the released model's tokenizer (JS divergence "
                    "of token unigrams, perplexity against held-out text), latency and error-rate SLO figures and "
                    "the feedback score of one window's traffic of one model size.",
    )
    def drift_report(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                     artifact_store: ArtifactStoreResource, serving_traffic: ArtifactHandle,
                     release: ArtifactHandle, dataset_splits: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        monitoring = current.stages.monitoring
        keys = context.partition_key.keys_by_dimension
        size, window = keys[SIZE], keys[WINDOW]
        step = f"drift_report[{context.partition_key}]"
        released, model = current_model(store, step, size, release)
        releases = {move.sha256 for move in release_history(store, size)} | {released}

        def build(out: Path) -> dict:
            from llm_assets.hf_models import load_causal_lm, load_tokenizer  # torch loads with the step

            traffic = store.local_dir(serving_traffic.sha256)
            requests, feedback = size_traffic(pl.read_parquet(traffic / REQUESTS_FILE),
                                              pl.read_parquet(traffic / FEEDBACK_FILE), releases)
            model_dir = store.local_dir(model["sha256"], verify=True)
            train, test = reference_texts(store.local_dir(dataset_splits.sha256), monitoring.reference_docs)
            try:
                figures = drift.drift_figures(
                    requests, feedback, load_causal_lm(model_dir, f"model of release {released[:12]}"),
                    load_tokenizer(model_dir),
                    drift.DriftInputs(train, test[:monitoring.max_prompts], monitoring.max_prompts,
                                      monitoring.max_tokens))
            except drift.NoPromptTextError as exc:
                raise dg.Failure(f"{step}: {exc}") from None
            summary = {"model_size": size, "window": window, "release": released, "model": model["sha256"],
                       "requests": requests.height, "feedback": feedback.height,
                       "figures": {k: v if math.isfinite(v) else None for k, v in figures.items()}}  # JSON has no NaN
            (out / DRIFT_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            return {**figures, "requests": requests.height, "feedback_records": feedback.height}

        result = materialize_artifact(
            context, store, kind="drift_report", build=build,
            config={"recipe": monitoring, "release": released, "model": model["sha256"]},
            inputs={"serving_traffic": serving_traffic, "release": release, "dataset_splits": dataset_splits},
            input_files={"release": ()})
        history = sorted(
            (mat.partition.keys_by_dimension[WINDOW], {k: v.value for k, v in mat.metadata.items()})
            for mat in latest_materializations(context.instance, context.asset_key).values()
            if mat.partition.keys_by_dimension[SIZE] == size and mat.partition.keys_by_dimension[WINDOW] != window)
        # Metadata values as built are plain numbers; read back from a cache hit, MetadataValues.
        history = sorted([*history, (window, {k: getattr(result.metadata[k], "value", result.metadata[k])
                                             for k in drift.FIGURES})])
        return dg.Output(result.value, data_version=result.data_version, metadata={
            **result.metadata,
            "over_windows": dg.MetadataValue.md(figures_over_windows(history, drift.FIGURES, f"drift of {size}"))})

    drift_names = [name for name in drift.DRIFT_GATES if name in manifest.gates]
    drift_gates = gate_check(drift_report, name="drift_gates", gates=drift_names, read=drift_reader(drift_names),
                             description="The served prompts' and the feedback's drift gates hold (a failure "
                                         "triggers a fine-tune): " + ", ".join(drift_names))
    slo_names = [name for name in drift.SLO_GATES if name in manifest.gates]
    slo_gates = gate_check(drift_report, name="slo_gates", gates=slo_names, read=drift_reader(slo_names),
                           description="The latency and error-rate gates hold: " + (", ".join(slo_names) or "none set"))

    @dg.asset_check(asset=drift_report, blocking=False, partitions_def=by_size_and_window,
                    description="Warns when the feedback not yet fine-tuned on (in windows no feedback_dataset has "
                                "read) reaches stages.monitoring.retrain_feedback: the loop fine-tunes on it.")
    def feedback_backlog(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
        keys = context.partition_key.keys_by_dimension
        size, threshold = keys[SIZE], pipeline.load().stages.monitoring.retrain_feedback
        # The latest feedback_dataset read every window there was: a fine-tune proposed and not yet
        # decided has trained on them, so their feedback does not start another with each new window.
        trained_on = _windows_read(context.instance, size)
        count = sum(int(mat.metadata["feedback_records"].value)
                    for mat in latest_materializations(context.instance, drift_report.key).values()
                    if mat.partition.keys_by_dimension[SIZE] == size and "feedback_records" in mat.metadata
                    and mat.partition.keys_by_dimension[WINDOW] not in trained_on)
        return dg.AssetCheckResult(
            passed=count < threshold, severity=dg.AssetCheckSeverity.WARN,
            metadata={"feedback_not_trained_on": count, "retrain_feedback": threshold},
            description=f"{count} feedback record(s) of {size} not yet fine-tuned on (retrain at {threshold})")

    @artifact_asset(
        partitions_def=dg.StaticPartitionsDefinition(sorted(manifest.model_sizes)), code_version="1",
        kinds={"polars"}, group_name="serving", automation_condition=retrain_condition(drift_gates, feedback_backlog),
        # It reads every window's traffic; the size's drift reports only trigger it (recorded, not read).
        deps=[dg.AssetDep(drift_report, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(SIZE)),
              dg.AssetDep(serving_traffic, partition_mapping=dg.AllPartitionMapping())],
        ins={"dataset_splits": dg.AssetIn()},
        description="Users' feedback on a size's releases: positive ratings as SFT examples, corrections as "
                    "preference pairs, decontaminated against the eval sets. Materialized by declarative automation "
                    "when new traffic fails a drift gate or brings retrain_feedback records.",
    )
    def feedback_dataset(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                         artifact_store: ArtifactStoreResource, dataset_splits: ArtifactHandle
                         ) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        size = context.partition_key
        traffic = {key: ArtifactHandle.from_materialization(mat) for key, mat in
                   latest_materializations(context.instance, serving_traffic.key).items()}
        reports = {str(key): ArtifactHandle.from_materialization(mat) for key, mat in
                   latest_materializations(context.instance, drift_report.key).items()
                   if mat.partition.keys_by_dimension[SIZE] == size}
        releases = {move.sha256 for move in release_history(store, size)}

        def build(out: Path) -> dict:
            frames = [size_traffic(pl.read_parquet(store.local_dir(h.sha256) / REQUESTS_FILE),
                                   pl.read_parquet(store.local_dir(h.sha256) / FEEDBACK_FILE), releases)
                      for h in traffic.values()]
            test = pl.read_parquet(store.local_dir(dataset_splits.sha256) / "test.parquet")
            data = feedback_data(pl.concat([r for r, _ in frames]), pl.concat([f for _, f in frames]),
                                 decontamination_texts(current, test), current.stages.posttrain_data.ngram)
            for name, frame in ((SFT_FILE, data.sft), (PREFERENCE_FILE, data.preferences)):
                frame.write_ndjson(out / name)
            return {**{k: v for k, v in data.stats.items() if isinstance(v, int)},
                    "dropped_overlap": dg.MetadataValue.json(data.stats["dropped_overlap"])}

        return materialize_artifact(context, store, kind="feedback_dataset", build=build,
                                    config={"releases": sorted(releases), "ngram": current.stages.posttrain_data.ngram},
                                    inputs={"serving_traffic": traffic, "dataset_splits": dataset_splits},
                                    narrowed_inputs={"drift_report": reports},
                                    input_files={"dataset_splits": ["test.parquet"], "drift_report": ()})

    return dg.Definitions(assets=[serving_traffic, drift_report, feedback_dataset],
                          asset_checks=[traffic_residual_pii, drift_gates, slo_gates, feedback_backlog],
                          sensors=[serving_traffic_sensor])


def _windows_read(instance: dg.DagsterInstance, size: str) -> set[str]:
    """The traffic windows the size's latest feedback_dataset read (its recorded inputs)."""
    mat = latest_materializations(instance, dg.AssetKey("feedback_dataset"), [size]).get(size)
    return {r["partition"] for r in input_records(mat) if r["asset"] == "serving_traffic"} if mat else set()
