"""serving_traffic and drift_report on a real instance: log files written as the server writes them
(one window in the model's distribution, one shifted), the sensor requesting only complete windows,
the traffic redacted and scanned, the drift gate passing the first window and failing the second,
and the feedback backlog counting what no feedback_dataset has read yet.
The model is the evaluation tests' tiny one, recorded as the current release of size `xs`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.release_pointer import RELEASE_JSON, move_release
from llm_assets.store import open_store
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.evaluation.conftest import TINY
from llm_assets_tests.monitoring.conftest import (
    IN_DISTRIBUTION,
    SHIFTED,
    feedback_record,
    request_record,
    spread,
    write_log,
)
from llm_assets_tests.posttrain.test_assets import step_failure
from llm_assets_tests.quantize.test_assets import record

H1 = datetime(2026, 11, 30, 10, tzinfo=UTC)  # in distribution
H2 = H1 + timedelta(hours=1)  # shifted
DRIFT_GATES = {"drift.js_divergence": {"max": 0.25}, "drift.perplexity_ratio": {"max": 10.0},
               "drift.error_rate": {"max": 0.2}, "drift.feedback_score": {"min": -0.5}}


def key(at: datetime) -> str:
    return at.strftime("%Y-%m-%d-%H:%M")


def drift_key(at: datetime) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"model_size": "xs", "window": key(at)})


@pytest.fixture
def monitored(settings, manifest_path: Path, tmp_path: Path, trained_dir: Path, heldout: pl.DataFrame):
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"].update(
        pretrain={"steps": 1, "batch_size": 1, "seq_len": 32, "learning_rate": 1e-3}, evaluation={},
        serving={}, tokenizer={"vocab_size": TINY.vocab_size},
        monitoring={"log_dir": str(tmp_path / "logs"), "start": "2026-11-29", "reference_docs": 64,
                    "max_prompts": 64, "max_tokens": 64, "retrain_feedback": 2})
    manifest["model_sizes"] = {"xs": TINY.model_dump()}
    manifest["gates"] = {"pretrain_val_loss": {"max": 10.0}, **SAFETY_GATES, **DRIFT_GATES}
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    store = open_store(settings.store_uri)
    splits = tmp_path / "splits"
    (splits / "train").mkdir(parents=True)
    heldout.write_parquet(splits / "train" / "stdlib-0000.parquet")
    heldout.write_parquet(splits / "test.parquet")
    record(instance, store, "dataset_splits", None, splits, "dataset_splits")
    # The released model, under a name outside the graph: the release's input-chain gate judges it
    # against no parent.
    model = record(instance, store, "released_model", "xs", trained_dir, "hf_model")
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / RELEASE_JSON).write_text(json.dumps(
        {"model": {"asset": "released_model", "partition": "xs", "sha256": model}}))
    release = record(instance, store, "release", "xs", tmp_path / "release", "release")
    move_release(store, "xs", release, "promote", by="test")
    return defs, instance, store, release, tmp_path / "logs"


def run(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str, partition) -> dg.ExecuteInJobResult:
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets(asset),
                          partition_key=partition, instance=instance, resources=defs.resources, raise_on_error=False)


def check_passed(result: dg.ExecuteInJobResult, name: str) -> tuple[bool, str]:
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation.passed, evaluation.description or ""


def test_traffic_is_ingested_redacted_and_drift_gated(monitored) -> None:
    defs, instance, store, release, logs = monitored
    times = spread(H1, len(IN_DISTRIBUTION))
    first = [request_record(t, p, release=release, rid=f"cmpl-a{i}")
             for i, (t, p) in enumerate(zip(times, IN_DISTRIBUTION, strict=True))]
    first[0]["prompt"] = "Mail jane.doe@example.org what `Cube.volume` does"
    first[1] |= {"status": 500, "error": "internal_error"}
    write_log(logs, "requests", H1, first)
    write_log(logs, "feedback", H1, [
        feedback_record(H1 + timedelta(minutes=5), "cmpl-a2", 1, release=release),
        feedback_record(H1 + timedelta(minutes=6), "cmpl-a3", -1, "Call +1 415 555 0100", release=release)])
    second = [request_record(t, p, release=release) for t, p in zip(spread(H2, len(SHIFTED)), SHIFTED, strict=True)]
    still_open = write_log(logs, "requests", H2 + timedelta(minutes=30), second, closed=False)

    # The sensor requests the complete window only: records from H2:30 on are still in an open file.
    sensor = defs.get_sensor_def("serving_traffic_sensor")
    tick = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    assert [r.partition_key for r in tick.run_requests] == [key(H1)]
    still_open.rename(still_open.with_name(still_open.name.removesuffix(".open")))
    tick = sensor(dg.build_sensor_context(instance=instance, definitions=defs, cursor=tick.cursor))
    assert [r.partition_key for r in tick.run_requests] == [key(H2)]

    for window in (H1, H2):
        result = run(defs, instance, "serving_traffic", key(window))
        assert result.success, step_failure(instance, result.run_id)
        assert check_passed(result, "traffic_residual_pii")[0]
    [mat] = [m for m in instance.fetch_materializations(dg.AssetKey("serving_traffic"), limit=10).records
             if m.partition_key == key(H1)]
    traffic = store.local_dir(mat.asset_materialization.metadata["sha256"].value)
    requests = pl.read_parquet(traffic / "requests.parquet")
    feedback = pl.read_parquet(traffic / "feedback.parquet")
    assert requests.height == len(IN_DISTRIBUTION) and feedback.height == 2
    assert requests["prompts"][0].to_list() == ["Mail <EMAIL> what `Cube.volume` does"]
    assert feedback["correction"].to_list()[1] == "Call <PHONE>"

    steady = run(defs, instance, "drift_report", drift_key(H1))
    assert steady.success, step_failure(instance, steady.run_id)
    passed, why = check_passed(steady, "drift_gates")
    assert passed, why
    figures = steady.asset_materializations_for_node("drift_report")[0].metadata
    assert figures["drift.error_rate"].value == pytest.approx(1 / len(IN_DISTRIBUTION))
    assert figures["drift.feedback_score"].value == 0.0
    passed, why = check_passed(steady, "feedback_backlog")  # two records reach retrain_feedback: 2
    assert not passed and why.startswith("2 feedback record(s) of xs not yet fine-tuned on"), why

    shifted = run(defs, instance, "drift_report", drift_key(H2))
    passed, why = check_passed(shifted, "drift_gates")
    assert not passed
    assert "drift.js_divergence" in why and "drift.perplexity_ratio" in why, why
    assert "over_windows" in shifted.asset_materializations_for_node("drift_report")[0].metadata

    # Once a feedback_dataset has read both windows, their feedback no longer counts towards the
    # next fine-tune: a window that lands before the candidate is decided does not start another.
    assert run(defs, instance, "feedback_dataset", "xs").success
    passed, why = check_passed(run(defs, instance, "drift_report", drift_key(H2)), "feedback_backlog")
    assert passed and why.startswith("0 feedback record(s)"), why


def test_an_open_window_and_prompts_not_logged_are_refused_with_what_to_do(monitored) -> None:
    defs, instance, _, release, logs = monitored
    write_log(logs, "requests", H1, [request_record(t, None, release=release) for t in spread(H1, 3)])
    write_log(logs, "requests", H1 + timedelta(minutes=50), [], closed=False)
    result = run(defs, instance, "serving_traffic", key(H1))
    assert not result.success
    assert "still in open log files" in step_failure(instance, result.run_id)

    (logs / f"requests-{(H1 + timedelta(minutes=50)).strftime('%Y%m%dT%H%M%S.%fZ')}.jsonl.open").unlink()
    assert run(defs, instance, "serving_traffic", key(H1)).success
    result = run(defs, instance, "drift_report", drift_key(H1))
    assert not result.success
    assert "--log-prompts" in step_failure(instance, result.run_id)

