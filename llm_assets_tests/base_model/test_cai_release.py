"""The release of a size whose policy trains on constitutional-AI pairs waits on
`cai_refusal_rate_gate`: that gate sits on `policy_without_cai`, a sibling of the released policy,
and a failing verdict there holds the release in a later run as any gate of its lineage does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import yaml

from llm_assets.definitions import build_resources
from llm_assets.evaluation import cai_gate
from llm_assets.manifest import load_manifest
from llm_assets.release import assets as release_assets
from llm_assets_tests.base_model.test_import import qwen_dir  # noqa: F401
from llm_assets_tests.checks.test_gate_failures import run, stage_check, stand_in
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.posttrain.test_assets import EVALUATION
from llm_assets_tests.posttrain.test_cai import _cai_manifest

SIZES = dg.StaticPartitionsDefinition(["qwen"])


def write(figures: dict) -> Callable[[Path], dict]:
    def build(out: Path) -> dict:
        (out / "figures.json").write_text(json.dumps(figures))
        return figures

    return build


def test_a_failing_cai_gate_holds_the_release(settings, tmp_path, qwen_dir):  # noqa: F811
    manifest = _cai_manifest(tmp_path, qwen_dir)
    manifest["stages"]["evaluation"] = EVALUATION
    manifest["gates"].update(SAFETY_GATES)
    path = tmp_path / "cai.yaml"
    path.write_text(yaml.safe_dump(manifest))
    settings = settings.__class__(**{**settings.__dict__, "manifest": str(path)})
    loaded = load_manifest(path)
    # Realistic bad input: the policy trained with the CAI pairs refuses the held-out red-team
    # prompts less often (0.1) than the same recipe without them (0.6).
    stand_ins = [stand_in("policy", "posttrain", write({}), partitions_def=SIZES),
                 stand_in("eval_report", "evaluation", write({}), partitions_def=SIZES),
                 stand_in("policy_without_cai", "evaluation", write({cai_gate.WITH: 0.1, cai_gate.WITHOUT: 0.6}),
                          partitions_def=SIZES)]
    gate = stage_check(cai_gate.build_defs(loaded), "cai_refusal_rate_gate")
    resources = build_resources(settings, loaded)
    lineage = dg.Definitions(assets=stand_ins, asset_checks=[gate], resources=resources).resolve_asset_graph()
    [release] = release_assets.build_defs(loaded, lineage).assets
    with dg.DagsterInstance.ephemeral() as instance:
        upstream = run([*stand_ins, release], [gate], resources, instance, partition="qwen",
                       selection=[a.key for a in stand_ins])
        [verdict] = upstream.get_asset_check_evaluations()
        assert not verdict.passed and "without_cai baseline" in verdict.description

        refused = run([*stand_ins, release], [], resources, instance, partition="qwen", selection=[release.key])
        assert not refused.success
        [failure] = [e for e in refused.all_events if e.is_step_failure]
        message = failure.step_failure_data.error.message
        assert "release[qwen] refused" in message
        assert "policy_without_cai[qwen] cai_refusal_rate_gate: failed" in message

