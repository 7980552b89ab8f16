"""training_sane on a continued size (a base model trained further): judged against the base
model's own val loss on the same windows, not against an untrained or unigram model."""

from __future__ import annotations

from llm_assets.manifest import CONTINUED_GATE
from llm_assets.pretrain.assets import _training_figures
from llm_assets_tests.checks.test_gates import manifest_with_gates, run_gate_check

GATES = {CONTINUED_GATE: {"baseline": "base", "max_delta": 0.05}}


def continued(mat):
    return _training_figures(mat, continued=True)


def test_a_base_model_that_forgot_fails_the_continued_pretraining_gate(tmp_path) -> None:
    """Realistic bad input: a learning rate too high for a trained model; its val loss rose from the
    base's 2.31 to 2.62 nats per token. The same run held at 2.33 passes, and a flat train loss (a
    base already fluent in the corpus) is no failure for a continued size."""
    manifest = manifest_with_gates(GATES)
    held = {"initial_loss": 2.4, "final_train_loss": 2.4, "final_val_loss": 2.33, "base_val_loss": 2.31,
            "unigram_val_loss": 6.2}
    passed = run_gate_check(tmp_path / "store", manifest, held, [CONTINUED_GATE], continued, "training_sane")
    assert passed.passed and passed.downstream_ran, passed.description

    forgot = run_gate_check(tmp_path / "store", manifest, {**held, "final_val_loss": 2.62}, [CONTINUED_GATE],
                            continued, "training_sane")
    assert not forgot.passed and not forgot.downstream_ran
    assert "> base baseline 2.31 + max_delta 0.05" in forgot.description
