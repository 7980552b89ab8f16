"""Experiment tracking and traces against a real MLflow server (sqlite backend) on 127.0.0.1:
runs, params, step metrics and one trace per Dagster run with a span per asset and per gate
verdict; the training stages' load and train phases and trl's tokens per second; a retry is a new
attempt's run; cache hits log nothing; the model server's span per request; the embedded
default's store without a server; a server killed mid-run, or one that never answers, leaves the
materialization green; MLflow's UI, driven by headless Chromium, compares two training runs
(`LLM_ASSETS_UPDATE_SCREENSHOT=1` refreshes the picture docs/tracking.md shows,
docs/img/mlflow-compare.png)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import mlflow
import playwright.sync_api as playwright
import pytest
import yaml

import resources.tracking
from llm_assets.artifacts import META_MLFLOW_RUN_ID, META_TRACKING, artifact_asset, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.serving import ServeConfig, create_app, running
from llm_assets.settings import PROJECT_ROOT, Settings
from llm_assets.tracing import ENDPOINT_VARIABLES, run_trace_id
from llm_assets.tracking import STEP_METRICS, flatten_params, step_series
from llm_assets_tests.conftest import TEST_MANIFEST, _free_port, stop_process_group
from llm_assets_tests.posttrain.test_assets import with_posttraining

# The serving tests' tiny model, stored as an artifact: imported fixtures, not copies of them.
from llm_assets_tests.serving.conftest import heldout, model_artifact, tokenizer_dir, trained_dir  # noqa: F401
from llm_assets_tests.test_ui import headless_chromium
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, ArtifactHandleIOManager
from resources.pipeline import PipelineResource
from resources.tracking import TrackingResource

SERVER_START_TIMEOUT_S = 600  # seconds on an idle machine, minutes on a busy one (importing its app)
PRETRAIN = "pretrain_checkpoint"
COMPARE_SCREENSHOT = PROJECT_ROOT / "docs" / "img" / "mlflow-compare.png"
# The compare page scrolls inside a panel, not the page: tall enough to hold the plot, the run
# details, the params and the metrics in one picture.
COMPARE_VIEWPORT = {"width": 1400, "height": 1540}
UI_TIMEOUT_MS = 30_000  # a page's first load on a busy machine; the expect() default of 5 s is too short


@dataclass(frozen=True)
class Server:
    url: str
    proc: subprocess.Popen


def start_mlflow(root: Path) -> Server:
    port = _free_port()
    log = open(root / "mlflow.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: not used here
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return Server(url, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process_group(proc)
                raise RuntimeError(f"mlflow server did not start: {(root / 'mlflow.log').read_text()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[Server]:
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        stop_process_group(server.proc)


def point_at(monkeypatch, url: str, experiment: str) -> str:
    """Track and trace to the server at `url` through the standard variables; the experiment's id."""
    experiment_id = mlflow.MlflowClient(url).create_experiment(experiment)
    track_to(monkeypatch, url, experiment, experiment_id)
    return experiment_id


def track_to(monkeypatch, url: str, experiment: str, experiment_id: str) -> None:
    """The variables that send runs and traces to an existing experiment on the server at `url`."""
    monkeypatch.setenv("LLM_ASSETS_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-mlflow-experiment-id={experiment_id}")


def step_resources(tmp_path: Path, manifest_path: Path) -> dict:
    """What an artifact asset needs, the tracking resource on its defaults (the environment's)."""
    return {"pipeline": PipelineResource(manifest_path=str(manifest_path)), "artifact_io": ArtifactHandleIOManager(),
            "artifact_store": ArtifactStoreResource(uri=str(tmp_path / "store")), "tracking": TrackingResource()}


def spans_of_run(client: mlflow.MlflowClient, experiment_id: str, run_id: str) -> list:
    """Every span of the Dagster run's trace (its trace id is the run id)."""
    [found] = [t for t in client.search_traces(locations=[experiment_id], max_results=100)
               if t.info.trace_id == f"tr-{run_trace_id(run_id):032x}"]
    return found.data.spans


def test_params_are_flattened_and_curves_become_step_metrics() -> None:
    assert flatten_params({"train": {"steps": 20, "lr": 0.01}, "sizes": ["xs"], "seed": 7}) == {
        "train.steps": "20", "train.lr": "0.01", "sizes": "['xs']", "seed": "7"}
    assert flatten_params({"files": ["x" * 100] * 100})["files"].__len__() == 6000  # MLflow's limit
    series = step_series({
        "loss_history": [[1, 5.5], [2, 5.0]], "val_history": [[2, 128, 5.2]],
        "step_metrics": [{"step": 1, "loss": 5.5, "grad_norm": 1.5, "learning_rate": 0.01}, {"step": 2, "loss": 5.0}],
    })
    assert series == {"loss": [(1, 5.5), (2, 5.0)], "grad_norm": [(1, 1.5)], "learning_rate": [(1, 0.01)],
                      "train_loss": [(1, 5.5), (2, 5.0)], "val_loss": [(2, 5.2)]}


# The assets the tracker must show (issue #18): every training stage, the evaluation, the quantization, the fit.
TRACKED_ASSETS = ("pretrain_checkpoint", "scaling_law", "sft_model", "reward_model", "policy", "eval_report",
                  "quantized_model")


def test_every_training_evaluation_and_quantization_asset_is_tracked(settings) -> None:
    # The project's own manifest: every stage is in it.
    defs = build_definitions(dataclasses.replace(settings, manifest=str(PROJECT_ROOT / "pipeline.yaml")))
    stages = TrackingResource().stages
    graph = defs.resolve_asset_graph()
    for name in TRACKED_ASSETS:
        key = dg.AssetKey(name)
        assert graph.get(key).group_name in stages, f"{name} is in no tracked stage ({stages})"
        assert "tracking" in defs.resolve_assets_def(key).required_resource_keys, f"{name} gets no tracking resource"


@dataclass(frozen=True)
class TrackedGraph:
    """The graph up to SFT of one size, materialized once with tracking on, for the tests that read it."""

    url: str
    experiment: str
    experiment_id: str
    defs: dg.Definitions
    instance: dg.DagsterInstance
    records: dict[str, dg.EventLogRecord]  # the training stages' materializations, as first built


@pytest.fixture(scope="module")
def tracked_graph(tmp_path_factory, mlflow_server) -> Iterator[TrackedGraph]:
    """Pretraining (20 steps) and a trl stage (SFT, 6 steps) of xs, and everything upstream of them,
    tracked and traced to an experiment of their own: the most expensive set-up of this file, paid
    once for the graph test and the trl test (the same upstream, built twice otherwise)."""
    root = tmp_path_factory.mktemp("tracked-graph")
    manifest_path = root / "pipeline.yaml"
    manifest_path.write_text(yaml.safe_dump(TEST_MANIFEST, sort_keys=False))
    manifest = with_posttraining(manifest_path)
    manifest["stages"]["pretrain"].update(steps=20, eval_every=10, checkpoint_every=10)
    manifest["stages"]["sft"].update(steps=6, eval_every=3, checkpoint_every=0)
    # About tracking, not the data half's gates: the tests' two stdlib packages share text across splits.
    manifest["stages"]["contamination"] = {"max_contaminated_fraction": 1.0}
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(Settings(manifest=str(manifest_path), store_uri=str(root / "artifacts"),
                                      alerts_jsonl=str(root / "alerts.jsonl"), alert_webhook_url=None,
                                      s3_endpoint_url=None))
    # An in-memory instance: the claims are about MLflow's runs and traces, and a sqlite one costs
    # seconds per run.
    with pytest.MonkeyPatch.context() as monkeypatch, dg.DagsterInstance.ephemeral() as instance:
        experiment_id = point_at(monkeypatch, mlflow_server.url, "graph")
        assert materialize_graph(defs, instance, selection="+key:sft_model", partitions=["xs"],
                                 log=lambda _: None).success
        records = {asset: instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["xs"]), limit=1).records[0]
            for asset in (PRETRAIN, "sft_model")}
        yield TrackedGraph(mlflow_server.url, "graph", experiment_id, defs, instance, records)


@pytest.mark.slow
def test_a_materialized_graph_is_tracked_and_traced_on_a_real_server(tracked_graph, monkeypatch) -> None:
    experiment_id, defs, instance = tracked_graph.experiment_id, tracked_graph.defs, tracked_graph.instance
    client = mlflow.MlflowClient(tracked_graph.url)
    # The tracked stages' assets are (pretraining, SFT and its dataset); the data half and the tokenizer are not.
    runs = {r.data.tags["asset"]: r for r in client.search_runs([experiment_id])}
    assert sorted(runs) == [PRETRAIN, "sft_dataset", "sft_model"]
    run = runs[PRETRAIN]
    tags, params = run.data.tags, run.data.params
    mat = tracked_graph.records[PRETRAIN]
    meta = {k: v.value for k, v in mat.asset_materialization.metadata.items()}
    assert (tags["asset"], tags["partition"], tags["attempt"]) == (PRETRAIN, "xs", "1")
    assert tags["dagster_run_id"] == mat.run_id and tags["fingerprint"] == meta["fingerprint"]
    assert tags["artifact_sha256"] == meta["sha256"] and tags["artifact_uri"] == meta["uri"]
    assert tags["git_commit"] and tags["code_version"] == meta["code_version"]
    assert params["train.steps"] == "20" and "train.learning_rate" in params
    assert meta[META_MLFLOW_RUN_ID] == run.info.run_id and meta[META_TRACKING].startswith("logged")
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) > 1 and sorted(m.step for m in losses) == [m.step for m in losses]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [10, 20]
    assert run.data.metrics["final_train_loss"] == meta["final_train_loss"]
    assert run.data.metrics["tokens_per_second"] > 0 and "cost_usd" in run.data.metrics

    # One trace per Dagster run, a span per materialized asset partition with its phases.
    traces = {t.info.trace_id: t for t in client.search_traces(locations=[experiment_id], max_results=100)}
    trace = traces[f"tr-{run_trace_id(mat.run_id):032x}"]
    spans = {s.name: s for s in trace.data.spans}
    span = spans[f"materialize {PRETRAIN}[xs]"]
    assert span.attributes["fingerprint"] == meta["fingerprint"] and span.attributes["cache_hit"] is False
    assert span.attributes["final_train_loss"] == meta["final_train_loss"]
    assert (span.attributes["asset"], span.attributes["partition"]) == (PRETRAIN, "xs")
    assert span.attributes["sha256"] == meta["sha256"] and span.attributes["wall_seconds"] > 0
    assert span.attributes["cost_usd"] == meta["cost_usd"] and span.attributes["tokens_seen"] == meta["tokens_seen"]
    assert {"verify", "build", "save"} <= {s.name for s in trace.data.spans if s.parent_id == span.span_id}
    # The gate's verdict on what this run built: a span of the same trace, in the check's step.
    gate = spans[f"check {PRETRAIN}[xs] training_sane"]
    assert gate.attributes["gate.check"] == "training_sane" and gate.attributes["sha256"] == meta["sha256"]
    [evaluation] = [r.event_log_entry.dagster_event.event_specific_data for r in instance.get_records_for_run(
        mat.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        if r.event_log_entry.dagster_event.event_specific_data.check_name == "training_sane"]
    assert gate.attributes["gate.passed"] is evaluation.passed
    assert gate.attributes["gate.pretrain_val_loss.value"] == meta["final_val_loss"]
    for dagster_run in instance.get_runs():
        in_run = instance.get_records_for_run(dagster_run.run_id,
                                              of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        if not in_run:
            continue
        named = [s.name for s in traces[f"tr-{run_trace_id(dagster_run.run_id):032x}"].data.spans
                 if s.name.startswith("materialize ")]
        assert len(named) == len(in_run) == len(set(named)), f"one span per asset partition in {dagster_run.run_id}"

    # A cache hit of the tracked step: no new MLflow run, and the materialization names the run that
    # built it. The step runs (skip_unchanged=False): its own cache hit, not the driver's skip.
    track_to(monkeypatch, tracked_graph.url, tracked_graph.experiment, experiment_id)
    assert materialize_graph(defs, instance, selection=f"key:{PRETRAIN}", partitions=["xs"],
                             log=lambda _: None, skip_unchanged=False).success
    assert sorted(r.info.run_id for r in client.search_runs([experiment_id])) == sorted(
        r.info.run_id for r in runs.values())
    again = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(PRETRAIN), asset_partitions=["xs"]), limit=1).records[0]
    again_meta = again.asset_materialization.metadata
    assert again_meta["cache_hit"].value and again_meta[META_MLFLOW_RUN_ID].value == run.info.run_id
    assert META_TRACKING not in again_meta


def children(spans: list, parent) -> dict:
    """The spans directly under `parent`, by name."""
    return {span.name: span for span in spans if span.parent_id == parent.span_id}


@pytest.mark.slow
def test_a_trl_stage_logs_its_steps_and_traces_its_load_and_train_phases(tracked_graph) -> None:
    experiment_id, records = tracked_graph.experiment_id, tracked_graph.records
    client = mlflow.MlflowClient(tracked_graph.url)

    # The SFT run: its recipe as params, trl's log lines as step metrics with their throughput.
    [run] = client.search_runs([experiment_id], "tags.asset = 'sft_model'")
    meta = {k: v.value for k, v in records["sft_model"].asset_materialization.metadata.items()}
    assert meta[META_MLFLOW_RUN_ID] == run.info.run_id
    assert run.data.params["recipe.steps"] == "6" and run.data.params["recipe.learning_rate"] == "0.003"
    history = {name: client.get_metric_history(run.info.run_id, name)
               for name in ("loss", "learning_rate", "tokens_per_second", "eval_loss")}
    assert [m.step for m in history["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in history["tokens_per_second"]] == [1, 2, 3, 4, 5, 6]
    assert all(m.value > 0 for m in history["tokens_per_second"])
    assert [m.step for m in history["eval_loss"]] == [3, 6]
    assert run.data.metrics["final_train_loss"] == meta["final_train_loss"]
    assert run.data.metrics["val_loss"] == meta["val_loss"]

    # Each training step's trace: load and train under build, under the materialization; pretraining's
    # phases are timed in its worker process and replayed in the step, in order and within build.
    for asset, record in records.items():
        spans = spans_of_run(client, experiment_id, record.run_id)
        [materialized] = [s for s in spans if s.name == f"materialize {asset}[xs]"]
        assert {"verify", "build", "save"} <= set(children(spans, materialized))
        build = children(spans, materialized)["build"]
        phases = children(spans, build)
        assert {"load", "train"} <= set(phases), asset
        load, train = phases["load"], phases["train"]
        assert build.start_time_ns <= load.start_time_ns < load.end_time_ns <= train.start_time_ns, asset
        assert train.end_time_ns <= build.end_time_ns, asset
        assert "phases" not in record.asset_materialization.metadata  # spans, not metadata


@pytest.mark.slow
def test_a_server_killed_mid_run_leaves_the_materialization_green(tmp_path, manifest_path, monkeypatch) -> None:
    server = start_mlflow(tmp_path)
    try:
        point_at(monkeypatch, server.url, "killed")

        @artifact_asset(name="model", group_name="pretrain")
        def model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                  artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
            def build(out: Path) -> dict:
                os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies while the model trains
                server.proc.wait()
                (out / "weights.bin").write_bytes(b"weights")
                return {"final_train_loss": 2.5, "loss_history": [[1, 3.0], [2, 2.5]]}

            return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", config={"steps": 2},
                                        build=build)

        started, instance = time.monotonic(), dg.DagsterInstance.ephemeral()
        result = dg.materialize([model], instance=instance, raise_on_error=False,
                                resources=step_resources(tmp_path, manifest_path))
        took = time.monotonic() - started
        assert result.success
        [mat] = result.get_asset_materialization_events()
        meta = mat.materialization.metadata
        assert meta[META_TRACKING].value.startswith("failed: logging the results at http://127.0.0.1")
        assert META_MLFLOW_RUN_ID not in meta
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        assert any("experiment tracking failed, the artifact is stored all the same" in m for m in logs)
        assert took < 60, f"a dead server held the step {took:.0f} s"
    finally:
        if server.proc.poll() is None:
            stop_process_group(server.proc)


def test_the_embedded_default_tracks_without_a_server_and_a_retry_is_a_new_attempt(
        tmp_path, manifest_path, monkeypatch) -> None:
    # The quickstart's store is a file in the checkout (`make mlflow` opens it); here one in a checkout of its own.
    assert resources.tracking.DEFAULT_TRACKING_URI == f"sqlite:///{PROJECT_ROOT / '.mlflow' / 'mlflow.db'}"
    database = tmp_path / "checkout" / ".mlflow" / "mlflow.db"
    monkeypatch.setattr(resources.tracking, "DEFAULT_TRACKING_URI", f"sqlite:///{database}")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", *ENDPOINT_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_ASSETS_TRACKING", "on")
    curve = [{"step": step, "loss": 3.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5, "tokens_per_second": 900.0}
             for step in (1, 2, 3)]

    @artifact_asset(name="sft_model", group_name="posttrain", retry_policy=dg.RetryPolicy(max_retries=1))
    def sft_model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                  artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        def build(out: Path) -> dict:
            if context.retry_number == 0:
                raise RuntimeError("the node went away")  # the first attempt dies while it trains
            (out / "weights.bin").write_bytes(b"weights")
            return {"final_train_loss": 1.0, STEP_METRICS: dg.MetadataValue.json(curve)}

        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", build=build,
                                    config={"train": {"learning_rate": 1e-3}})

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([sft_model], instance=instance, resources=step_resources(tmp_path, manifest_path))
    assert result.success and database.is_file()
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("llm-assets")
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.data.tags["attempt"])
    # One run per attempt, both under the one Dagster run: the first ended FAILED, the retry is a run of its own.
    assert [(r.info.run_name, r.info.status) for r in runs] == [("sft_model #1", "FAILED"),
                                                                ("sft_model #2", "FINISHED")]
    assert {r.data.tags["dagster_run_id"] for r in runs} == {result.run_id}
    built = runs[1]
    for metric in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert [m.step for m in client.get_metric_history(built.info.run_id, metric)] == [1, 2, 3], metric
    assert built.data.params == {"train.learning_rate": "0.001"}
    [mat] = result.get_asset_materialization_events()
    assert mat.materialization.metadata[META_MLFLOW_RUN_ID].value == built.info.run_id

    again = dg.materialize([sft_model], instance=instance, resources=step_resources(tmp_path, manifest_path))
    [hit] = again.get_asset_materialization_events()
    assert hit.materialization.metadata["cache_hit"].value
    assert hit.materialization.metadata[META_MLFLOW_RUN_ID].value == built.info.run_id  # the run that built it
    assert len(client.search_runs([experiment.experiment_id])) == 2  # a cache hit logs nothing


def test_gate_verdicts_and_cache_hits_are_spans_of_the_run_trace(
        tmp_path, manifest_path, monkeypatch, mlflow_server) -> None:
    experiment_id = point_at(monkeypatch, mlflow_server.url, "gates")
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["gates"] = {"pretrain_val_loss": {"max": 3.0}}
    manifest_path.write_text(yaml.safe_dump(manifest))
    val_loss = {"good": 2.5, "diverged": 4.0}

    @artifact_asset(name="model", group_name="pretrain", partitions_def=dg.StaticPartitionsDefinition([*val_loss]))
    def model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
              artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        def build(out: Path) -> dict:
            (out / "weights.bin").write_bytes(context.partition_key.encode())
            return {"final_val_loss": val_loss[context.partition_key]}

        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", build=build)

    check = gate_check(model, name="loss_sane", gates=["pretrain_val_loss"], description="val loss within its gate",
                       read=lambda mat: Figures(values={"pretrain_val_loss": mat.metadata["final_val_loss"].value}))
    client, instance = mlflow.MlflowClient(mlflow_server.url), dg.DagsterInstance.ephemeral()

    def materialize(partition: str) -> dict:
        result = dg.materialize([model, check], instance=instance, partition_key=partition, raise_on_error=False,
                                resources=step_resources(tmp_path, manifest_path))
        return {span.name: span for span in spans_of_run(client, experiment_id, result.run_id)}

    good, diverged = materialize("good"), materialize("diverged")
    assert good["check model[good] loss_sane"].attributes.items() >= {
        "asset": "model", "partition": "good", "gate.check": "loss_sane", "gate.passed": True, "gate.failed": "",
        "gate.pretrain_val_loss.value": 2.5, "gate.pretrain_val_loss.passed": True}.items()
    assert diverged["check model[diverged] loss_sane"].attributes.items() >= {
        "partition": "diverged", "gate.passed": False, "gate.severity": "ERROR", "gate.failed": "pretrain_val_loss",
        "gate.pretrain_val_loss.value": 4.0, "gate.pretrain_val_loss.passed": False}.items()
    # The check's span sits under its own step's span, in the run's trace.
    check_step = next(span for name, span in diverged.items() if name.startswith("step ") and "loss_sane" in name)
    assert diverged["check model[diverged] loss_sane"].parent_id == check_step.span_id

    # A cache hit re-hashes the stored artifact (its heavy phase) and builds nothing.
    hit = materialize("good")
    materialized = hit["materialize model[good]"]
    assert materialized.attributes["cache_hit"] is True
    assert {span.name for span in hit.values() if span.parent_id == materialized.span_id} == {"verify cached"}
    assert hit["check model[good] loss_sane"].attributes["gate.passed"] is True


def test_the_model_server_emits_a_span_per_request(model_artifact, monkeypatch, mlflow_server) -> None:  # noqa: F811
    experiment_id = point_at(monkeypatch, mlflow_server.url, "serving")
    model_dir, sha256 = model_artifact
    app = create_app(model_dir, sha256, ServeConfig(max_tokens=4))
    asked = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "def", "max_tokens": 2}),
             ("POST", "/v1/completions", {"prompt": "def", "max_tokens": -1})]
    answered = []
    with running(app) as url:
        for method, path, body in asked:
            request = urllib.request.Request(url + path, method=method, headers={"Content-Type": "application/json"},
                                             data=None if body is None else json.dumps(body).encode())
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answered.append(response.status)
            except urllib.error.HTTPError as error:
                answered.append(error.code)
    assert answered == [200, 200, 400]
    # The app's stop exported its last spans: one trace per request, its server span naming route and status.
    traces = mlflow.MlflowClient(mlflow_server.url).search_traces(locations=[experiment_id], max_results=10)
    spans = sorted(((s.name, s.attributes["http.response.status_code"], s.attributes["llm.model_sha256"])
                    for t in traces for s in t.data.spans))
    assert spans == sorted((f"{method} {path}", status, sha256) for (method, path, _), status in zip(asked, answered))


def test_a_tracking_server_that_never_answers_costs_the_step_only_its_timeout(
        tmp_path, manifest_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_ASSETS_TRACKING", "on")
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", *ENDPOINT_VARIABLES):
        monkeypatch.delenv(name, raising=False)  # the resource's limits apply

    @artifact_asset(name="reward_model", group_name="posttrain")
    def reward_model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                     artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        def build(out: Path) -> dict:
            (out / "weights.bin").write_bytes(b"weights")
            return {"final_train_loss": 0.6}

        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", build=build)

    with socket.socket() as silent:  # takes connections, never answers: a hung tracking server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = dg.materialize([reward_model], instance=dg.DagsterInstance.ephemeral(), resources={
            **step_resources(tmp_path, manifest_path),
            "tracking": TrackingResource(tracking_uri=url, request_timeout_s=2, max_retries=0)})
        took = time.monotonic() - started
    assert result.success
    [mat] = result.get_asset_materialization_events()
    assert mat.materialization.metadata[META_TRACKING].value.startswith(f"failed: opening the run at {url}")
    assert took < 30, f"a hung server held the step {took:.0f} s"


class TinyPretraining(dg.Config):
    learning_rate: float


@artifact_asset(name=PRETRAIN, group_name="pretrain")
def tiny_pretraining(context: dg.AssetExecutionContext, config: TinyPretraining, pipeline: PipelineResource,
                     artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
    """Pretraining in miniature: the loss falls faster with a larger learning rate."""
    def build(out: Path) -> dict:
        (out / "weights.bin").write_bytes(f"weights trained at {config.learning_rate}".encode())
        losses = [[step, 2.0 + 5.0 * math.exp(-6 * config.learning_rate * step)] for step in range(1, 41)]
        return {"final_train_loss": losses[-1][1], "loss_history": losses,
                "val_history": [[step, 4096 * step, loss + 0.2] for step, loss in losses if step % 10 == 0]}

    return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", build=build,
                                config={"train": {"steps": 40, "learning_rate": config.learning_rate}})


def test_the_mlflow_ui_compares_two_training_runs(tmp_path, manifest_path, monkeypatch, mlflow_server) -> None:
    experiment_id = point_at(monkeypatch, mlflow_server.url, "llm-assets")
    instance = dg.DagsterInstance.ephemeral()
    for learning_rate in (0.01, 0.003):
        assert dg.materialize([tiny_pretraining], instance=instance, resources=step_resources(tmp_path, manifest_path),
                              run_config=dg.RunConfig({PRETRAIN: TinyPretraining(learning_rate=learning_rate)})).success
    runs = mlflow.MlflowClient(mlflow_server.url).search_runs([experiment_id])
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == ["0.003", "0.01"]

    with playwright.sync_playwright() as pw:
        browser = headless_chromium(pw)
        try:
            context = browser.new_context(viewport=COMPARE_VIEWPORT, device_scale_factor=2)
            # On a first visit MLflow opens its assistant's panel over the page: mark it seen and closed.
            context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                                    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            # What a user does: the experiment's runs, both ticked, then Compare.
            page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs")
            rows = page.get_by_role("row").filter(has_text=f"{PRETRAIN} #1")
            playwright.expect(rows).to_have_count(len(runs), timeout=UI_TIMEOUT_MS)
            for row in range(len(runs)):
                rows.nth(row).get_by_role("checkbox").first.check()
            page.get_by_role("button", name="Compare").click()

            playwright.expect(page.get_by_text(f"Comparing {len(runs)} Runs from 1 Experiment")).to_be_visible(
                timeout=UI_TIMEOUT_MS)
            for run in runs:
                playwright.expect(page.get_by_role("link", name=run.info.run_id)).to_be_visible()
            learning_rates = page.get_by_role("row").filter(has_text="train.learning_rate")
            playwright.expect(learning_rates).to_contain_text("0.01")
            playwright.expect(learning_rates).to_contain_text("0.003")
            # The parallel-coordinates plot is drawn: an axis per compared figure, each spanning both runs'
            # values (the learning rates at the ends of the first).
            plot = page.locator(".js-plotly-plot")
            playwright.expect(plot).to_contain_text("train.learning_rate", timeout=UI_TIMEOUT_MS)
            playwright.expect(plot).to_contain_text("train_loss")
            playwright.expect(plot).to_contain_text("0.01000")
            playwright.expect(plot).to_contain_text("0.00300")
            page.get_by_role("button", name="Toggle sidebar").click()  # the compare tables get the whole width
            page.wait_for_timeout(500)  # let the sidebar finish collapsing before the picture
            shot = tmp_path / "mlflow-compare.png"
            page.screenshot(path=str(shot))
            if os.environ.get("LLM_ASSETS_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, COMPARE_SCREENSHOT)
        finally:
            browser.close()
