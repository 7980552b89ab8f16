"""The training sweep on a real instance: checkpoints resume after SIGKILL, the cost gate refuses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.settings import Settings
from llm_assets_tests.conftest import TEST_MANIFEST

PRETRAIN = dg.AssetKey("pretrain_checkpoint")
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "vocab_size": 320,
        "max_seq_len": 64}
SMALL = {**TINY, "hidden_size": 64, "intermediate_size": 128}


def with_training(manifest_path: Path, **pretrain) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"]["tokenizer"] = {"vocab_size": 320, "sample_mb": 0.3}
    manifest["stages"]["pretrain"] = {
        "steps": 40, "batch_size": 4, "seq_len": 32, "learning_rate": 0.01, "warmup_steps": 4,
        "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10, **pretrain,
    }
    manifest["model_sizes"] = {"xs": TINY, "s": SMALL}
    manifest["gates"] = {"pretrain_val_loss": {"max": 5.7}}
    manifest_path.write_text(yaml.safe_dump(manifest))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """The data half, tokenizer and tokens of `with_training`'s manifest, materialized once for the
    file into a Dagster home (`home`) and an artifact store (`artifacts`). The tests' manifests
    differ only from the training step down: each starts from its own copy (the `home` fixture)."""
    root = tmp_path_factory.mktemp("pretrain-upstream")
    manifest_path = root / "pipeline.yaml"
    manifest_path.write_text(yaml.safe_dump(TEST_MANIFEST, sort_keys=False))
    with_training(manifest_path)
    settings = Settings(manifest=str(manifest_path), store_uri=str(root / "artifacts"),
                        alerts_jsonl=str(root / "alerts.jsonl"), alert_webhook_url=None, s3_endpoint_url=None)
    (root / "home").mkdir()
    with dg.DagsterInstance.local_temp(str(root / "home")) as instance:
        assert materialize_graph(build_definitions(settings), instance,
                                 selection="+key:token_shards or +key:heldout_tokens", log=lambda _: None).success
    return root


@pytest.fixture
def home(upstream: Path, settings: Settings, tmp_path: Path) -> Path:
    """This test's Dagster home, and its store at settings.store_uri: copies of `upstream`'s, so that
    what a test trains, kills or forgets stays its own."""
    shutil.copytree(upstream / "artifacts", settings.store_uri)
    return Path(shutil.copytree(upstream / "home", tmp_path / "home"))


def latest(instance, partition):
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PRETRAIN, asset_partitions=[partition]), limit=1
    ).records[0].asset_materialization


def mat_run_id(instance, partition):
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PRETRAIN, asset_partitions=[partition]), limit=1
    ).records[0].run_id


def test_the_sweep_trains_every_size_under_torchrun_and_fits_a_scaling_law(settings, manifest_path, home):
    with_training(manifest_path)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["compute"] = {"training": {"gpus": 0, "nproc_per_node": 2}}  # two gloo ranks per size
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        assert materialize_graph(defs, instance, selection="key:pretrain_checkpoint+", log=lambda _: None).success
        for size in ("xs", "s"):
            mat = latest(instance, size)
            meta = mat.metadata
            # Reported by rank 0 through Dagster Pipes, once.
            assert meta["world_size"].value == 2 and meta["steps"].value == 40
            assert meta["final_train_loss"].value < meta["initial_loss"].value
            assert meta["tokens_per_second"].value > 0 and 0 < meta["mfu"].value < 1
            assert [p[0] for p in meta["val_history"].value] == [10, 20, 30, 40]
            assert meta["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
            logs = [e.user_message for e in instance.all_logs(mat_run_id(instance, size))]
            assert sum("step 40/40: loss" in m for m in logs) == 1, "rank 0 streams progress, the others do not"
            assert sum("checkpoint of step 20 committed" in m for m in logs) == 1
        law = instance.get_latest_materialization_event(dg.AssetKey("scaling_law")).asset_materialization.metadata
        assert law["points_fitted"].value == 8 and law["sizes"].value == 2 and law["next_params"].value > 0


def test_a_killed_training_run_resumes_from_its_last_checkpoint(settings, manifest_path, home):
    with_training(manifest_path, steps=40)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"] = {"xs": TINY}
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)

    env = {**os.environ, "DAGSTER_HOME": str(home), "LLM_ASSETS_MANIFEST": settings.manifest,
           "LLM_ASSETS_STORE": settings.store_uri, "LLM_ASSETS_ALERTS_JSONL": settings.alerts_jsonl}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_assets.cli", "materialize", "--select", "key:pretrain_checkpoint"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    store = Path(settings.store_uri)
    progress = store / "progress" / "pretrain_checkpoint"
    deadline = time.time() + 300
    while not any(progress.rglob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its training worker
    proc.wait()
    assert any(progress.rglob("*.json")), "a checkpoint was committed before the kill"

    with dg.DagsterInstance.local_temp(str(home)) as instance:
        assert materialize_graph(defs, instance, selection="key:pretrain_checkpoint", log=lambda _: None).success
        resumed = latest(instance, "xs").metadata
        assert resumed["resumed_from_step"].value >= 10, "training continued, not restarted"
        assert resumed["steps"].value == 40

        # Resume is exact on CPU: forget the step's cached artifact and its progress, train it again
        # uninterrupted from step 0, and the model is byte-identical.
        for record in (*(store / "index" / "pretrain_checkpoint").rglob("*.json"), *progress.rglob("*.json")):
            record.unlink()
        assert materialize_graph(defs, instance, selection="key:pretrain_checkpoint", log=lambda _: None).success
        fresh = latest(instance, "xs").metadata
        assert fresh["resumed_from_step"].value == -1 and fresh["cache_hit"].value is False
        assert fresh["sha256"].value == resumed["sha256"].value


def test_the_cost_gate_refuses_a_run_over_budget(settings, manifest_path, home):
    with_training(manifest_path)
    manifest = yaml.safe_load(manifest_path.read_text())
    # On a CPU the step is priced at CPU core-hours: a core this slow makes it cost more than the cap.
    manifest["budget"].update({"usd_cap": 0.01, "cpu_flops_per_core": 1.0})
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        result = materialize_graph(defs, instance, selection="key:pretrain_checkpoint+", log=lambda _: None)
        assert not result.success
        failure = next(
            e for run in instance.get_runs() if run.is_failure for e in instance.all_logs(run.run_id)
            if e.dagster_event and e.dagster_event.is_step_failure
        )
        assert "refused: training" in failure.dagster_event.event_specific_data.error.message
        assert "over budget.usd_cap $0.01" in failure.dagster_event.event_specific_data.error.message

        # Within budget but a recipe the model cannot take: the worker's own error becomes the step's.
        manifest["budget"].update({"usd_cap": 100.0, "cpu_flops_per_core": 1.5e10})
        manifest["stages"]["pretrain"]["seq_len"] = 128  # the models hold 64 positions
        manifest_path.write_text(yaml.safe_dump(manifest))
        # One size shows it: each launches its own worker.
        result = materialize_graph(build_definitions(settings), instance, selection="key:pretrain_checkpoint",
                                   partitions=["xs"], log=lambda _: None)
        assert not result.success
        messages = [
            e.dagster_event.event_specific_data.error.message for run in instance.get_runs() if run.is_failure
            for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_step_failure
        ]
        assert any("training xs failed: ValueError: seq_len 128 exceeds the model's max_position_embeddings 64" in m
                   for m in messages), messages
