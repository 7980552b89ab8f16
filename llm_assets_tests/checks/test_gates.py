"""Numeric gates against absolute thresholds and against the current release's figure."""

import json
import tempfile
from pathlib import Path

import pytest

from llm_assets.checks.gates import GateOverride, judge_gate, list_overrides, record_override, store_override
from llm_assets.manifest import GateSpec
from llm_assets.release_pointer import RELEASE_JSON, move_release
from llm_assets.store import ArtifactStore, open_store


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
