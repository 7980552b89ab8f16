"""Post-training on a real instance: SFT, reward model and DPO policy from a tiny pretrained model;
a killed SFT step resumes from its committed checkpoint; the KL budget holds what depends on the
policy, the release included, until a reviewer overrides it; a gate relative to the release alerts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import yaml

from llm_assets.cli import main
from llm_assets.definitions import build_definitions
from llm_assets.lock import build_lock
from llm_assets.manifest import load_manifest
from llm_assets.release_pointer import current_release, read_release
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.pretrain.test_assets import with_training
from llm_assets_tests.test_alerts import read_jsonl, tick

TRAINER = {"batch_size": 4, "max_length": 96, "warmup_ratio": 0.1}
POSTTRAIN = {
    "sft": {**TRAINER, "steps": 24, "learning_rate": 3e-3, "checkpoint_every": 4},
    "reward": {**TRAINER, "steps": 16, "learning_rate": 2e-3, "checkpoint_every": 0},
    "policy": {**TRAINER, "steps": 8, "learning_rate": 1e-3, "beta": 0.1, "checkpoint_every": 0, "kl_prompts": 16},
}
GATES = {"sft_val_loss": {"max": 8.0}, "reward_accuracy": {"min": 0.0}, "policy_kl": {"max": 100.0},
         "heldout_perplexity.bits_per_byte": {"max": 8.0}, **SAFETY_GATES}
EVALUATION = {"max_docs": 12, "batch_size": 4, "safety_max_new_tokens": 8}
# The same, with each shipped safety prompt file (32 prompts) answered in one batch: generating those
# answers is most of an evaluation step. The tests that import EVALUATION keep the batch they were set with.
ONE_BATCH_EVALUATION = {**EVALUATION, "batch_size": 32}


def latest(instance: dg.DagsterInstance, asset: str) -> dg.AssetMaterialization:
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["xs"]), limit=1
    ).records[0].asset_materialization


def check_passed(instance: dg.DagsterInstance, asset: str, check: str) -> bool:
    """The latest verdict of a check (the tests here have one partition)."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    status = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].status.value
    assert status in ("SUCCEEDED", "FAILED"), status
    return status == "SUCCEEDED"


def with_posttraining(manifest_path: Path, evaluation: dict = EVALUATION) -> dict:
    with_training(manifest_path, steps=30)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"] = {"xs": manifest["model_sizes"]["xs"]}
    manifest["stages"].update(POSTTRAIN)
    manifest["stages"]["posttrain_data"] = {"max_answer_chars": 160}
    manifest["stages"]["evaluation"] = evaluation
    manifest["gates"].update(GATES)
    manifest_path.write_text(yaml.safe_dump(manifest))
    return manifest


def test_sft_reward_policy_train_resume_and_gate(settings, manifest_path, tmp_path, monkeypatch, capsys):
    manifest = with_posttraining(manifest_path, ONE_BATCH_EVALUATION)
    home = tmp_path / "home"
    home.mkdir()
    defs = build_definitions(settings)
    upstream = "+key:pretrain_checkpoint or key:sft_dataset or key:preference_dataset"
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        assert materialize_graph(defs, instance, selection=upstream, log=lambda _: None).success
        sft_data = instance.get_latest_materialization_event(dg.AssetKey("sft_dataset")).asset_materialization
        assert sft_data.metadata["train_examples"].value > 20 and sft_data.metadata["val_examples"].value > 0

    # SIGKILL the SFT step once its first checkpoint is committed to the store.
    env = {**os.environ, "DAGSTER_HOME": str(home), "LLM_ASSETS_MANIFEST": settings.manifest,
           "LLM_ASSETS_STORE": settings.store_uri, "LLM_ASSETS_ALERTS_JSONL": settings.alerts_jsonl}
    output = tmp_path / "sft-cli.log"
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_assets.cli", "materialize", "--select", "key:sft_model"],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    progress = Path(settings.store_uri) / "progress" / "sft_model"
    deadline = time.time() + 300
    while not any(progress.rglob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the SFT step ended before it was killed:\n{output.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(progress.rglob("*.json")), "a checkpoint was committed before the kill"

    with dg.DagsterInstance.local_temp(str(home)) as instance:
        result = materialize_graph(
            defs, instance, selection="key:sft_model or key:reward_model or key:policy or key:eval_report",
            log=lambda _: None)
        assert result.success
        sft = latest(instance, "sft_model").metadata
        assert sft["resumed_from_step"].value >= 4, "SFT continued from its checkpoint, not from step 0"
        assert sft["steps"].value == 24
        assert sft["val_loss"].value < sft["base_val_loss"].value
        reward = latest(instance, "reward_model").metadata
        assert 0.0 <= reward["accuracy"].value <= 1.0 and reward["val_pairs"].value > 0
        policy = latest(instance, "policy").metadata
        assert policy["algorithm"].value == "dpo" and policy["reference_sha256"].value == sft["sha256"].value
        assert 0 < policy["kl_nats_per_sequence"].value < 100
        report = latest(instance, "eval_report").metadata
        assert report["heldout_perplexity.bits_per_byte"].value < 8.0
        assert 0.0 <= report["heldout_mc.acc"].value <= 1.0 and 0.0 <= report["safety.refusal_rate"].value <= 1.0
        assert report["extra.kl_nats_per_sequence"].value == policy["kl_nats_per_sequence"].value
        assert "## heldout_mc" in report["report"].value
        for asset, check in (("sft_model", "sft_val_loss_gate"), ("reward_model", "reward_accuracy_gate"),
                             ("policy", "policy_kl_gate"), ("eval_report", "eval_gates")):
            assert check_passed(instance, asset, check), (asset, check)

        assert report["compared_with"].value == "no release yet"

        # A KL budget the policy exceeds: the gate fails and holds everything downstream of it.
        manifest["gates"]["policy_kl"] = {"max": 1e-9}
        manifest_path.write_text(yaml.safe_dump(manifest))
        defs = build_definitions(settings)
        downstream = "key:policy or key:eval_report or key:release"
        assert not materialize_graph(defs, instance, selection=downstream, log=lambda _: None).success
        assert not check_passed(instance, "policy", "policy_kl_gate")
        assert latest(instance, "policy").metadata["cache_hit"].value is True
        assert not instance.fetch_materializations(dg.AssetKey("release"), limit=1).records

        # A later run of the release alone holds no blocking check of the policy's: the release
        # reads the verdicts back from the instance and refuses.
        result = materialize_graph(defs, instance, selection="key:release", log=lambda _: None)
        assert not result.success
        refusal = step_failure(instance, result.failed_runs[0])
        assert "release[xs] refused: 1 blocking check(s)" in refusal
        assert "policy[xs] policy_kl_gate: failed: xs: policy_kl" in refusal
        assert "llm-assets override --gate policy_kl --partition xs" in refusal
        assert not instance.fetch_materializations(dg.AssetKey("release"), limit=1).records

        # A named reviewer overrides the gate for this very policy: it passes, on the record, and
        # the release goes through.
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("LLM_ASSETS_STORE", settings.store_uri)
        monkeypatch.setenv("LLM_ASSETS_ALERTS_JSONL", settings.alerts_jsonl)
        cli = ["--manifest", settings.manifest, "override", "--reviewer", "ana", "--reason", "budget set for a test"]
        assert main([*cli, "--gate", "policy_kll"]) == 1
        assert "did you mean 'policy_kl'?" in capsys.readouterr().err
        assert main([*cli, "--gate", "policy_kl"]) == 0
        assert "override recorded: gate policy_kl on policy[xs]" in capsys.readouterr().out
        key = dg.AssetCheckKey(dg.AssetKey("policy"), "policy_kl_gate")
        evaluation = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].event
        result = evaluation.dagster_event.event_specific_data
        assert result.passed and result.metadata["override_reviewer"].value == "ana"
        assert "overridden by ana (budget set for a test); would fail: xs: policy_kl" in result.description
        assert materialize_graph(defs, instance, selection="key:release", log=lambda _: None).success

        store = open_store(settings.store_uri)
        released = latest(instance, "release").metadata
        assert current_release(store, "xs") == released["sha256"].value
        document = read_release(store, released["sha256"].value)
        assert document["model"]["sha256"] == policy["sha256"].value
        assert document["eval_report"]["sha256"] == latest(instance, "eval_report").metadata["sha256"].value
        assert {"raw_corpus", "tokenizer", "pretrain_checkpoint", "sft_model", "reward_model", "policy",
                "eval_report"} <= {entry["asset"] for entry in document["lineage"]}
        assert document["gate_values"]["policy_kl"] == policy["kl_nats_per_sequence"].value
        assert [(o["gate"], o["reviewer"]) for o in document["overrides"]] == [("policy_kl", "ana")]
        # The run lock shows the override next to the very artifact it covers.
        lock = {(e["asset"], e["partition"]): e for e in build_lock(defs, instance, load_manifest(manifest_path),
                                                                    store)["assets"]}
        assert [(o["gate"], o["reviewer"], o["sha256"]) for o in lock[("policy", "xs")]["overrides"]] == [
            ("policy_kl", "ana", policy["sha256"].value)]
        assert not lock[("sft_model", "xs")]["overrides"]

        # A gate relative to the release: a new report (fewer documents) must beat the release's
        # bits per byte by a full bit. The gate fails, and the alert names the gate, the figure
        # and the thresholds.
        bpb = document["gate_values"]["heldout_perplexity.bits_per_byte"]
        manifest["gates"]["heldout_perplexity.bits_per_byte"] = {"max": 8.0, "baseline": "release", "max_delta": -1.0}
        manifest["stages"]["evaluation"] = {**ONE_BATCH_EVALUATION, "max_docs": 10}
        manifest_path.write_text(yaml.safe_dump(manifest))
        defs = build_definitions(settings)
        assert not materialize_graph(defs, instance, selection="key:eval_report", log=lambda _: None).success
        value = latest(instance, "eval_report").metadata["heldout_perplexity.bits_per_byte"].value
        tick(defs, instance, None)
        alert = [a for a in read_jsonl(settings.alerts_jsonl) if a["check"] == "eval_gates"][-1]
        assert alert["asset"] == "eval_report" and alert["partition"] == "xs" and alert["severity"] == "ERROR"
        assert (f"xs: heldout_perplexity.bits_per_byte {value:.4g} > release baseline {bpb:.4g} + max_delta -1"
                in alert["description"])
        assert float(alert["metadata"]["heldout_perplexity.bits_per_byte"]) == value
        assert float(alert["metadata"]["gate_heldout_perplexity.bits_per_byte_baseline"]) == bpb
        assert float(alert["metadata"]["gate_heldout_perplexity.bits_per_byte_max_delta"]) == -1.0
        assert float(alert["metadata"]["gate_heldout_perplexity.bits_per_byte_max"]) == 8.0
        # The released report itself (the evaluation recipe put back: a cache hit) is not measured
        # against its own figure: the gate holds.
        manifest["stages"]["evaluation"] = ONE_BATCH_EVALUATION
        manifest_path.write_text(yaml.safe_dump(manifest))
        assert materialize_graph(build_definitions(settings), instance, selection="key:eval_report",
                                 log=lambda _: None).success
        assert latest(instance, "eval_report").metadata["sha256"].value == document["eval_report"]["sha256"]
        assert check_passed(instance, "eval_report", "eval_gates")


def step_failure(instance: dg.DagsterInstance, run_id: str) -> str:
    """The error message of the run's failed step."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return "\n".join(e.dagster_event.event_specific_data.error.message for e in events)
