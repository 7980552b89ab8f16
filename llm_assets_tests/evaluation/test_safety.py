"""The safety gates of eval_report, through the real eval_gates check: refusals of held-out
harmful prompts may not drop against the current release, and refusals of everyday prompts stay
under a ceiling, so a model that refuses everything fails too."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_assets.evaluation.assets import report_reader
from llm_assets.evaluation.report import EvalReport, higher_is_better
from llm_assets.evaluation.safety import BENIGN_FILE, RED_TEAM_FILE, SafetyResult, load_prompts, refusal_rate
from llm_assets.manifest import load_manifest
from llm_assets.release_pointer import move_release
from llm_assets.store import open_store
from llm_assets_tests.checks.test_gates import _release, manifest_with_gates, run_gate_check

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HARMFUL, BENIGN = "safety.refusal_rate", "safety.benign_refusal_rate"
PRETRAIN = {"steps": 1, "batch_size": 1, "seq_len": 8, "learning_rate": 1e-3}  # never run: the manifest needs one


@pytest.fixture(scope="module")
def shipped_gates() -> dict[str, dict]:
    """The default manifest's safety gates: the tests judge with what ships."""
    gates = load_manifest(PROJECT_ROOT / "pipeline.yaml").gates
    return {name: gates[name].model_dump(exclude_none=True, exclude_defaults=True) for name in (HARMFUL, BENIGN)}


def _manifest(safety_gates: dict[str, dict]) -> dict:
    """A manifest with an evaluation stage (which needs a trained model: pretraining and its gate)."""
    return manifest_with_gates({**safety_gates, "pretrain_val_loss": {"max": 8.0}}, pretrain=PRETRAIN, evaluation={})


def _figures(model_dir: Path) -> dict[str, float]:
    """The safety figures of an eval_report materialization of the model in `model_dir`."""
    report = EvalReport(metrics={}, **{
        section: refusal_rate(model_dir, load_prompts(path), max_new_tokens=12, batch_size=8)
        for section, path in (("safety", RED_TEAM_FILE), ("benign", BENIGN_FILE))})
    return {f"{task}.{metric}": value for task, values in report.figures().items() for metric, value in values.items()}


def test_the_prompt_sets_are_distinct_and_realistic() -> None:
    harmful, benign = load_prompts(RED_TEAM_FILE), load_prompts(BENIGN_FILE)
    assert len(harmful) >= 25 and len(benign) >= 25
    assert not set(harmful) & set(benign) and len(set(benign)) == len(benign)


def test_a_model_that_refuses_everything_fails_the_helpfulness_gate(refusing_dir, untrained_dir, shipped_gates,
                                                                    tmp_path) -> None:
    manifest = _manifest(shipped_gates)
    refusing = _figures(refusing_dir)
    assert refusing[HARMFUL] >= 0.9 and refusing[BENIGN] >= 0.9  # it learned one answer, whatever the request
    judged = run_gate_check(tmp_path / "store", manifest, refusing, [HARMFUL, BENIGN], report_reader([HARMFUL, BENIGN]),
                            "eval_gates")
    assert not judged.passed and not judged.downstream_ran
    assert f"xs: {BENIGN} {refusing[BENIGN]:.4g} > gate max" in judged.description
    assert HARMFUL not in judged.description  # refusing the harmful prompts is right

    helpful = _figures(untrained_dir)
    assert run_gate_check(tmp_path / "store", manifest, helpful, [HARMFUL, BENIGN], report_reader([HARMFUL, BENIGN]),
                          "eval_gates").passed


def test_a_model_whose_refusal_rate_dropped_fails_the_safety_gate(refusing_dir, untrained_dir, shipped_gates,
                                                                 tmp_path) -> None:
    manifest = _manifest(shipped_gates)
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    # The current release refused 90% of the red-team prompts; the retrained model refuses none.
    move_release(store, "xs", _release(store, tmp_path, "xs", {HARMFUL: 0.9, BENIGN: 0.0}), "promote", "test")
    dropped = _figures(untrained_dir)
    judged = run_gate_check(store_dir, manifest, dropped, [HARMFUL, BENIGN], report_reader([HARMFUL, BENIGN]),
                            "eval_gates")
    assert not judged.passed and not judged.downstream_ran
    assert f"xs: {HARMFUL} {dropped[HARMFUL]:.4g} < release baseline 0.9 + min_delta" in judged.description
    # The benign ceiling still holds for a model that keeps its refusals, the relative gate too.
    kept = {HARMFUL: 0.9, BENIGN: 0.0}
    assert run_gate_check(store_dir, manifest, kept, [HARMFUL, BENIGN], report_reader([HARMFUL, BENIGN]),
                          "eval_gates").passed


def test_the_report_keeps_both_refusal_rates_and_knows_which_way_is_better() -> None:
    report = EvalReport(metrics={}, safety=SafetyResult(rate=0.5, refusals=1, prompts=2, examples=[]),
                        benign=SafetyResult(rate=0.25, refusals=1, prompts=4, examples=[]))
    assert report.figures() == {"safety": {"refusal_rate": 0.5, "benign_refusal_rate": 0.25}}
    assert EvalReport.from_json(report.to_json()) == report
    assert "benign_refusal_rate 0.25 (1 of 4 prompts)" in report.to_markdown()
    assert higher_is_better("refusal_rate") and not higher_is_better("benign_refusal_rate")
