"""canary_report on realistic server logs: a bad candidate (more 5xx, more refusals) fails the canary
gate and is rolled back, a good one is promoted, a canary without enough traffic waits; the release
step proposes instead of promoting when a canary is configured."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from llm_assets.canary import assets as canary
from llm_assets.canary.figures import canary_traffic
from llm_assets.cli import _candidate_to_serve
from llm_assets.definitions import build_resources
from llm_assets.manifest import load_manifest
from llm_assets.release_pointer import (
    RELEASE_JSON,
    candidate_release,
    current_release,
    promote_or_propose,
    release_history,
)
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.pretrain.test_assets import TINY, with_training
from resources.handles import ArtifactHandle, handle_metadata

SIZE = "tiny"
GATES = {
    "canary.candidate_requests": {"min": 20},
    "canary.error_rate_increase": {"max": 0.02},
    "canary.latency_p99_ratio": {"max": 1.5},
    "canary.refusal_rate_increase": {"max": 0.05},
}
ANSWERS = ["Use `json.dumps(obj, indent=2)` to pretty-print it.", "It returns a dict of the parsed fields."]
REFUSAL = "I'm sorry, but I can't help with that."


def canary_manifest(path: Path, log_dir: Path) -> Path:
    """The test manifest with training, evaluation and a canary of 20 % for one model size."""
    with_training(path)
    manifest = yaml.safe_load(path.read_text())
    manifest["stages"] |= {"evaluation": {}, "serving": {"canary": {"fraction": 0.2, "log_dir": str(log_dir)}}}
    manifest["model_sizes"] = {SIZE: TINY}
    manifest["gates"] |= {**SAFETY_GATES, **GATES}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def write_traffic(log_dir: Path, release: str, requests: int, *, error_rate: float, refusal_rate: float,
                  latency: float, seed: int, open_file: bool = False) -> None:
    """Request and feedback records as the server writes them (`--log-prompts` on), for one release."""
    rng = random.Random(seed)
    log_dir.mkdir(parents=True, exist_ok=True)
    lines, feedback = [], []
    for n in range(requests):
        errors = round(requests * error_rate)
        failed, refused = n < errors, errors <= n < errors + round(requests * refusal_rate)
        completion_id = f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}"
        record = {"time": "2026-12-02T10:00:00.000+00:00", "id": None if failed else completion_id,
                  "endpoint": "/v1/chat/completions", "status": 500 if failed else 200,
                  "error": "internal_error" if failed else None, "latency_s": round(latency * rng.uniform(0.8, 1.2), 4),
                  "prompt_tokens": 12, "completion_tokens": 0 if failed else 9, "model": "m" * 64,
                  "release": release, "scheme": None, "canary": "candidate"}
        if not failed:
            record |= {"stream": False, "choices": 1, "finish_reasons": ["stop"], "first_token_s": 0.01,
                       "messages": [{"role": "user", "content": "How do I pretty-print JSON?"}],
                       "completion": [REFUSAL if refused else rng.choice(ANSWERS)]}
            feedback.append({"time": record["time"], "id": f"fb-{n}", "completion_id": completion_id,
                             "rating": -1 if refused else 1, "correction": None, "model": "m" * 64,
                             "release": release})
        lines.append(record)
    # A client error is the client's: it counts in no release's error rate.
    lines.append({**lines[-1], "status": 400, "error": "invalid_field", "id": None})
    suffix = ".jsonl.open" if open_file else ".jsonl"
    (log_dir / f"requests-2026120{seed % 10}T100000.000000Z-{release[:6]}{suffix}").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + ('{"torn": ' if open_file else ""))
    (log_dir / f"feedback-2026120{seed % 10}T100000.000000Z-{release[:6]}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in feedback))


def stored_release(store, tmp_path: Path, n: int) -> str:
    src = tmp_path / f"release-{n}"
    src.mkdir()
    (src / RELEASE_JSON).write_text(json.dumps({"partition": SIZE, "n": n}))
    return store.put_dir(src).sha256


@pytest.fixture
def canary_setup(tmp_path, settings, manifest_path):
    """A store with a current release and a proposed candidate, and the canary's Definitions."""
    log_dir = tmp_path / "logs"
    canary_manifest(manifest_path, log_dir)
    manifest = load_manifest(str(manifest_path))
    resources = build_resources(settings, manifest)
    store = resources["artifact_store"].get_store()
    current, candidate = stored_release(store, tmp_path, 0), stored_release(store, tmp_path, 1)
    assert "promoted" in promote_or_propose(store, SIZE, current, canary=True, by="run 1")  # the first is promoted
    assert "is the candidate" in promote_or_propose(store, SIZE, candidate, canary=True, by="run 2")
    assert current_release(store, SIZE) == current and candidate_release(store, SIZE) == candidate
    return store, resources, canary.build_defs(manifest), log_dir, current, candidate


def run_canary(instance, resources, defs, store, candidate) -> dg.ExecuteInProcessResult:
    # The release asset's materialization the report consumes (its lineage): the candidate.
    handle = ArtifactHandle("release", SIZE, "release", candidate, store.ref(candidate).uri, 10)
    instance.report_runless_asset_event(dg.AssetMaterialization("release", partition=SIZE,
                                                                metadata=handle_metadata(handle)))
    [report] = defs.assets
    # The real release needs its whole lineage: a stand-in read through the same IO manager.
    release = dg.AssetSpec("release", partitions_def=report.partitions_def).with_io_manager_key("artifact_io")
    return dg.materialize([release, report, *defs.asset_checks], selection=[report.key], partition_key=SIZE,
                          instance=instance, resources=resources, raise_on_error=False)


def gate_verdict(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == "canary_gates"]
    return evaluation


def test_a_candidate_with_more_errors_and_refusals_fails_the_gate_and_is_rolled_back(canary_setup, instance):
    store, resources, defs, log_dir, current, candidate = canary_setup
    write_traffic(log_dir, current, 400, error_rate=0.005, refusal_rate=0.02, latency=0.2, seed=1)
    write_traffic(log_dir, candidate, 100, error_rate=0.08, refusal_rate=0.3, latency=0.21, seed=2, open_file=True)

    result = run_canary(instance, resources, defs, store, candidate)

    verdict = gate_verdict(result)
    assert not verdict.passed
    assert "canary.error_rate_increase" in verdict.description and "canary.refusal_rate_increase" in verdict.description
    assert current_release(store, SIZE) == current and candidate_release(store, SIZE) is None
    assert [m.action for m in release_history(store, SIZE)] == ["promote", "candidate", "reject"]
    [mat] = result.get_asset_materialization_events()
    assert mat.materialization.metadata["decision"].value == "reject"
    rows = {r.data["role"]: r.data for r in mat.materialization.metadata["traffic"].value.records}
    assert rows["candidate"]["requests"] == 100 and rows["candidate"]["errors"] == 8  # the 400 is left out
    assert rows["current"]["requests"] == 400
    # A rejected candidate is not proposed again by the release step.
    assert "not proposed again" in promote_or_propose(store, SIZE, candidate, canary=True, by="run 3")


def test_a_candidate_as_good_as_the_current_release_is_promoted(canary_setup, instance):
    store, resources, defs, log_dir, current, candidate = canary_setup
    write_traffic(log_dir, current, 400, error_rate=0.01, refusal_rate=0.05, latency=0.2, seed=3)
    write_traffic(log_dir, candidate, 100, error_rate=0.01, refusal_rate=0.05, latency=0.2, seed=4)

    result = run_canary(instance, resources, defs, store, candidate)

    assert gate_verdict(result).passed, gate_verdict(result).description
    assert current_release(store, SIZE) == candidate and candidate_release(store, SIZE) is None
    assert [(m.action, m.sha256) for m in release_history(store, SIZE)][-1] == ("promote", candidate)


def test_a_canary_with_too_little_traffic_waits_and_then_decides(canary_setup, instance):
    store, resources, defs, log_dir, current, candidate = canary_setup
    write_traffic(log_dir, current, 200, error_rate=0.0, refusal_rate=0.0, latency=0.2, seed=5)
    write_traffic(log_dir, candidate, 5, error_rate=0.0, refusal_rate=0.0, latency=0.2, seed=6)

    result = run_canary(instance, resources, defs, store, candidate)

    assert not gate_verdict(result).passed and "canary.candidate_requests 5 < gate min 20" in \
        gate_verdict(result).description
    assert candidate_release(store, SIZE) == candidate and current_release(store, SIZE) == current  # waits

    write_traffic(log_dir, candidate, 60, error_rate=0.0, refusal_rate=0.0, latency=0.2, seed=7)
    assert gate_verdict(run_canary(instance, resources, defs, store, candidate)).passed  # new traffic, new report
    assert current_release(store, SIZE) == candidate


def test_without_a_candidate_nothing_is_judged(canary_setup, instance):
    store, resources, defs, log_dir, current, candidate = canary_setup
    promote_or_propose(store, SIZE, candidate, canary=False, by="a reviewer")  # promoted by hand
    result = run_canary(instance, resources, defs, store, candidate)
    assert result.success and not result.get_asset_materialization_events()


def test_a_corrupt_log_line_is_named(tmp_path):
    log_dir = tmp_path / "logs"
    write_traffic(log_dir, "a" * 64, 3, error_rate=0, refusal_rate=0, latency=0.1, seed=8)
    [path] = log_dir.glob("requests-*.jsonl")
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match=rf"{path.name}:5: not a log record"):
        canary_traffic(log_dir, "a" * 64, "b" * 64)
    path.write_text(json.dumps({"release": "a" * 64, "endpoint": "/v1/completions", "status": "ok"}) + "\n")
    with pytest.raises(ValueError, match=r":1: request record without a valid 'status'"):
        canary_traffic(log_dir, "a" * 64, "b" * 64)
    with pytest.raises(FileNotFoundError, match="llm-assets serve --candidate bbbbbbbbbbbb"):
        canary_traffic(tmp_path / "nowhere", "a" * 64, "b" * 64)


def test_canary_gates_need_a_canary_and_known_names(tmp_path, manifest_path):
    path = canary_manifest(manifest_path, tmp_path / "logs")
    manifest = yaml.safe_load(path.read_text())
    manifest["gates"]["canary.latency_p50_ratio"] = {"max": 2}
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(Exception, match="canary.latency_p50_ratio: no such canary figure"):
        load_manifest(str(path))
    del manifest["gates"]["canary.latency_p50_ratio"]
    del manifest["stages"]["serving"]["canary"]
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(Exception, match="stages.serving.canary is not configured"):
        load_manifest(str(path))


def test_serve_candidate_names_what_it_cannot_serve(canary_setup, manifest_path):
    store, _, _, _, current, candidate = canary_setup
    manifest = load_manifest(str(manifest_path))
    with pytest.raises(ValueError, match="at least 6 characters"):
        _candidate_to_serve(store, manifest, SIZE, current, candidate[:3])
    with pytest.raises(ValueError, match="is the current release itself"):
        _candidate_to_serve(store, manifest, SIZE, current, current[:8])
    with pytest.raises(ValueError, match=f"no release of {SIZE} starts with 'ffffff'; the proposed candidate is "
                                         f"{candidate[:12]}"):
        _candidate_to_serve(store, manifest, SIZE, current, "ffffff")
