"""The post-training gates against the baselines their stages measure: the SFT model against its
base model, the reward model against its untrained head, on the same held-out rows and pairs."""

from __future__ import annotations

from pathlib import Path

from llm_assets.manifest import load_manifest
from llm_assets.posttrain.assets import REWARD_ACCURACY_GATE, SFT_VAL_LOSS_GATE, metric_reader
from llm_assets_tests.checks.test_gates import manifest_with_gates, run_gate_check

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = load_manifest(PROJECT_ROOT / "pipeline.yaml").gates
GATES = {name: SHIPPED[name].model_dump(exclude_none=True, exclude_defaults=True)
         for name in (SFT_VAL_LOSS_GATE, REWARD_ACCURACY_GATE)}


def test_an_sft_model_no_better_than_its_base_fails(tmp_path) -> None:
    read = metric_reader(SFT_VAL_LOSS_GATE, "val_loss", {"base": "base_val_loss"})
    manifest = manifest_with_gates(GATES)
    # The default graph's tiny-0.4m: 5.59 against its base model's 6.24.
    assert run_gate_check(tmp_path / "store", manifest, {"val_loss": 5.59, "base_val_loss": 6.24},
                          [SFT_VAL_LOSS_GATE], read).passed
    barely = run_gate_check(tmp_path / "store", manifest, {"val_loss": 6.2, "base_val_loss": 6.24},
                            [SFT_VAL_LOSS_GATE], read)
    assert not barely.passed and not barely.downstream_ran
    assert "xs: sft_val_loss 6.2 > base baseline 6.24 + max_delta -0.25" in barely.description


def test_a_reward_model_no_better_than_its_untrained_head_fails(tmp_path) -> None:
    read = metric_reader(REWARD_ACCURACY_GATE, "accuracy", {"untrained": "accuracy_before_training"})
    # The shipped thresholds as a real model's manifest keeps them: without the default's
    # `blocking: false` (its tiny models cannot learn the hard negatives).
    shipped = dict(GATES[REWARD_ACCURACY_GATE])
    assert shipped.pop("blocking") is False
    manifest = manifest_with_gates({**GATES, REWARD_ACCURACY_GATE: shipped})
    # A reward model that learned: 0.91 against 0.57 before training (shuffled-word pairs).
    assert run_gate_check(tmp_path / "store", manifest, {"accuracy": 0.91, "accuracy_before_training": 0.57},
                          [REWARD_ACCURACY_GATE], read).passed
    # Above chance, because the untrained head already was.
    unlearned = run_gate_check(tmp_path / "store", manifest, {"accuracy": 0.76, "accuracy_before_training": 0.74},
                               [REWARD_ACCURACY_GATE], read)
    assert not unlearned.passed and not unlearned.downstream_ran
    assert "xs: reward_accuracy 0.76 < untrained baseline 0.74 + min_delta 0.1" in unlearned.description
    # The default manifest as shipped: the same failure warns and holds nothing.
    warned = run_gate_check(tmp_path / "store-default", manifest_with_gates(GATES | {REWARD_ACCURACY_GATE: {
        **shipped, "blocking": False}}), {"accuracy": 0.54, "accuracy_before_training": 0.54},
        [REWARD_ACCURACY_GATE], read)
    assert not warned.passed and warned.downstream_ran
