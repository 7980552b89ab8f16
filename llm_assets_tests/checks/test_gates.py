"""Numeric gates against absolute thresholds and against the current release's figure."""

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.checks.gates import GateOverride, judge_gate, list_overrides, record_override, store_override
from llm_assets.manifest import GateSpec
from llm_assets.release_pointer import RELEASE_JSON, move_release
from llm_assets.store import ArtifactStore, open_store
from llm_assets_tests.conftest import TEST_MANIFEST
from resources.artifact_store_resource import ArtifactStoreResource
from resources.pipeline import PipelineResource

SHA256 = "a" * 64  # the artifact under check (the gate check reads only its recorded hash)


@dataclass(frozen=True)
class GateRun:
    passed: bool
    description: str
    metadata: dict[str, Any]
    downstream_ran: bool  # whether the asset after the gated one materialized in the same run


def run_gate_check(store_dir: Path, manifest: dict, metadata: dict[str, float], gates: list[str],
                   read: Callable[[dg.AssetMaterialization], Figures], name: str = "gate") -> GateRun:
    """Materialize a model-stage stand-in whose materialization carries `metadata`, its real
    blocking gate check (`gate_check` with the stage's `read`) and an asset downstream of it, in one
    run on an ephemeral Dagster instance, under `manifest` and the store in `store_dir`."""
    sizes = dg.StaticPartitionsDefinition(["xs"])

    @dg.asset(partitions_def=sizes, name="model")
    def model() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={**metadata, "sha256": SHA256})

    @dg.asset(partitions_def=sizes, deps=[model])
    def downstream() -> None:
        return None

    check = gate_check(model, name=name, gates=gates, read=read, description="the stage's gate")
    manifest_path = store_dir.parent / f"{store_dir.name}-pipeline.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest))
    result = dg.materialize([model, downstream, check], partition_key="xs", instance=dg.DagsterInstance.ephemeral(),
                            raise_on_error=False,
                            resources={"pipeline": PipelineResource(manifest_path=str(manifest_path)),
                                       "artifact_store": ArtifactStoreResource(uri=str(store_dir))})
    failures = [event.event_specific_data.error.to_string() for event in result.all_events if event.is_step_failure]
    [evaluation] = result.get_asset_check_evaluations() or pytest.fail(f"the gate check did not judge: {failures}")
    ran = {event.asset_key for event in result.get_asset_materialization_events()}
    return GateRun(evaluation.passed, evaluation.description or "",
                   {k: v.value for k, v in evaluation.metadata.items()}, downstream.key in ran)


def manifest_with_gates(gates: dict[str, dict], **stages: dict) -> dict:
    """The test manifest with these gates (and stages besides its own, e.g. evaluation={})."""
    return {**TEST_MANIFEST, "stages": {**TEST_MANIFEST["stages"], **stages}, "gates": gates}


@pytest.fixture
def local_store(tmp_path) -> ArtifactStore:
    return open_store(str(tmp_path / "store"))


def _release(store: ArtifactStore, tmp_path, partition: str, gate_values: dict) -> str:
    src = Path(tempfile.mkdtemp(dir=tmp_path))
    lineage = [{"asset": "eval_report", "partition": partition, "sha256": "e" * 64}]
    (src / RELEASE_JSON).write_text(json.dumps({"partition": partition, "gate_values": gate_values,
                                                "lineage": lineage}))
    return store.put_dir(src).sha256


def test_a_relative_gate_is_measured_from_the_current_release(local_store, tmp_path):
    gates = {"heldout_mc.acc": GateSpec(min=0.1, baseline="release", min_delta=-0.02)}
    # Before any release only the absolute bound applies; the baseline shows as NaN.
    first = judge_gate(local_store, gates, "heldout_mc.acc", 0.2, "xs", "a" * 64)
    assert first.passed and (
        first.metadata["gate_heldout_mc.acc_baseline"] != first.metadata["gate_heldout_mc.acc_baseline"]
    )

    move_release(local_store, "xs", _release(local_store, tmp_path, "xs", {"heldout_mc.acc": 0.5}), "promote", "test")
    worse = judge_gate(local_store, gates, "heldout_mc.acc", 0.45, "xs", "a" * 64)
    assert not worse.passed
    assert worse.description == "xs: heldout_mc.acc 0.45 < release baseline 0.5 + min_delta -0.02"
    assert worse.metadata["gate_heldout_mc.acc_baseline"] == 0.5 and worse.metadata["heldout_mc.acc"] == 0.45
    assert judge_gate(local_store, gates, "heldout_mc.acc", 0.49, "xs", "a" * 64).passed
    # The released report itself is not measured against its own figure.
    assert judge_gate(local_store, gates, "heldout_mc.acc", 0.45, "xs", "e" * 64).passed
    # Another model size has its own release (none yet): the relative bound does not apply.
    assert judge_gate(local_store, gates, "heldout_mc.acc", 0.45, "s", "a" * 64).passed
    # Absolute bounds still hold on their own.
    assert "< gate min 0.1" in judge_gate(local_store, gates, "heldout_mc.acc", 0.05, "s", "a" * 64).description


def test_an_override_covers_one_gate_on_one_artifact_and_survives_a_copy(local_store, tmp_path):
    gates = {"policy_kl": GateSpec(max=1.0)}
    record_override(local_store, "policy_kl", "policy", "xs", "b" * 64, "ana", "reviewed the samples")
    judged = judge_gate(local_store, gates, "policy_kl", 3.0, "xs", "b" * 64)
    assert judged.passed and judged.metadata["override_reviewer"] == "ana"
    assert "would fail: xs: policy_kl 3 > gate max 1" in judged.description
    assert not judge_gate(local_store, gates, "policy_kl", 3.0, "xs", "c" * 64).passed  # a retrained policy
    with pytest.raises(ValueError, match="needs a reviewer and a reason"):
        record_override(local_store, "policy_kl", "policy", "xs", "b" * 64, " ", "x")

    # Carried into another store (as a replay does), it holds for the same artifact there.
    other = open_store(str(tmp_path / "other"))
    store_override(other, GateOverride(**list_overrides(local_store)[0].__dict__))
    assert judge_gate(other, gates, "policy_kl", 3.0, "xs", "b" * 64).passed


def test_a_gate_against_a_measured_baseline_fails_when_the_figure_is_no_better(local_store):
    gates = {"pretrain_val_loss": GateSpec(max=8.3, baseline="unigram", max_delta=-0.3)}
    measured = {"untrained": 8.31, "unigram": 6.0}
    assert judge_gate(local_store, gates, "pretrain_val_loss", 5.2, "xs", "a" * 64, measured_baselines=measured).passed
    # A model no better than token frequencies: below the absolute max, but not below the unigram model.
    judged = judge_gate(local_store, gates, "pretrain_val_loss", 5.9, "xs", "a" * 64, measured_baselines=measured)
    assert not judged.passed
    assert judged.description == "xs: pretrain_val_loss 5.9 > unigram baseline 6 + max_delta -0.3"
    assert judged.metadata["gate_pretrain_val_loss_baseline"] == 6.0
    # A baseline the check does not measure, or could not, fails the gate rather than skipping it.
    missing = judge_gate(local_store, gates, "pretrain_val_loss", 5.2, "xs", "a" * 64,
                         measured_baselines={"untrained": 8.31})
    assert not missing.passed and "relative to the unigram baseline, which this check does not measure " \
                                  "(it measures: untrained" in missing.description
    nan = judge_gate(local_store, gates, "pretrain_val_loss", 5.2, "xs", "a" * 64,
                     measured_baselines={"unigram": float("nan")})
    assert not nan.passed and "the unigram baseline of pretrain_val_loss is nan" in nan.description


def test_a_measured_baseline_reaches_the_gate_check_and_blocks_the_next_asset(tmp_path):
    """Through the real gate check on a real instance: the stage's Figures carry the baseline."""

    def read(mat: dg.AssetMaterialization) -> Figures:
        return Figures(values={"reward_accuracy": mat.metadata["accuracy"].value},
                       baselines={"reward_accuracy": {"untrained": mat.metadata["accuracy_before_training"].value}})

    manifest = manifest_with_gates({"reward_accuracy": {"min": 0.5, "baseline": "untrained", "min_delta": 0.05}})
    store = tmp_path / "store"
    fine = run_gate_check(store, manifest, {"accuracy": 0.8, "accuracy_before_training": 0.55},
                          ["reward_accuracy"], read)
    assert fine.passed and fine.downstream_ran
    # Above chance, yet no better than the reward model before training: it learned nothing.
    no_better = run_gate_check(store, manifest, {"accuracy": 0.62, "accuracy_before_training": 0.6},
                               ["reward_accuracy"], read)
    assert not no_better.passed and not no_better.downstream_ran
    assert no_better.description == "xs: reward_accuracy 0.62 < untrained baseline 0.6 + min_delta 0.05"
    # `blocking: false` (the default manifest's reward gate, which its tiny models cannot pass): the
    # same failure is a warning that holds nothing.
    warned = manifest_with_gates({"reward_accuracy": {"min": 0.5, "baseline": "untrained", "min_delta": 0.05,
                                                      "blocking": False}})
    warning = run_gate_check(tmp_path / "store-warn", warned, {"accuracy": 0.62, "accuracy_before_training": 0.6},
                             ["reward_accuracy"], read)
    assert not warning.passed and warning.downstream_ran
    assert warning.description == no_better.description
