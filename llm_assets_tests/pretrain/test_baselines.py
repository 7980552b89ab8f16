"""The baselines training_sane is measured from: an untrained model and a unigram model of the
training tokens, scored on the same val windows as the trained model; a model that did not learn
fails the gate."""

from __future__ import annotations

import math

import pytest
import torch

from llm_assets.checks.gates import record_override
from llm_assets.pretrain import build_model, train
from llm_assets.pretrain.assets import VAL_LOSS_GATE, _training_figures
from llm_assets.pretrain.data import TokenBatches
from llm_assets.pretrain.job import summary
from llm_assets.pretrain.loop import unigram_val_loss
from llm_assets.store import open_store
from llm_assets_tests.checks.test_gates import SHA256, manifest_with_gates, run_gate_check
from llm_assets_tests.pretrain.tiny import BASE, TINY, UNIFORM_LOSS

# The default manifest's rule: below a uniform guess, and 0.3 nats below the unigram model.
GATES = {VAL_LOSS_GATE: {"max": round(UNIFORM_LOSS, 3), "baseline": "unigram", "max_delta": -0.3}}


def test_the_run_measures_its_baselines_on_the_val_windows(corpus, reference) -> None:
    baselines = reference.result.baseline_val_losses
    assert set(baselines) == {"untrained", "unigram"}
    assert baselines["untrained"] == pytest.approx(UNIFORM_LOSS, abs=0.1)  # an initialised model guesses uniformly
    # The chain's stationary distribution is not uniform, but close: token frequencies help little.
    assert baselines["unigram"] < baselines["untrained"]
    assert reference.result.final_val_loss < baselines["unigram"] - 1.0
    # A resumed run reads the baselines from its checkpoint rather than from the model it resumes.
    step_20 = next(path for path, step in reference.committed if step == 20)
    resumed = train(build_model(TINY, seed=123), corpus.train, corpus.val, BASE, resume_from=step_20)
    assert resumed.baseline_val_losses == baselines


def test_the_unigram_baseline_is_the_cross_entropy_of_token_frequencies(corpus) -> None:
    batches = TokenBatches(corpus.val, seq_len=BASE.seq_len, global_batch=BASE.batch_size, seed=BASE.seed)
    # Training data of one token: everything else has the add-one count only.
    loss = unigram_val_loss(type(corpus.train)([corpus.val_array[:1].repeat(99)]), batches, BASE, 256)
    targets = torch.cat([batches.rows(i, slice(None))[:, 1:].flatten() for i in range(BASE.eval_batches)])
    seen = (targets == int(corpus.val_array[0])).float()
    expected = -(seen * math.log(100 / 355) + (1 - seen) * math.log(1 / 355)).mean().item()
    assert loss == pytest.approx(expected)


@pytest.mark.parametrize("did_not_learn", [BASE.replace(learning_rate=1e-7), BASE.replace(steps=1, warmup_steps=1)],
                         ids=["learning_rate_1e-7", "one_step"])
def test_a_model_that_did_not_learn_fails_training_sane(corpus, reference, did_not_learn, tmp_path) -> None:
    manifest = manifest_with_gates(GATES)

    def figures(result) -> dict[str, float]:
        reported = summary(result, TINY.matmul_parameters(), torch.device("cpu"), 1)
        return {k: v for k, v in reported.items() if isinstance(v, (int, float))}

    trained = run_gate_check(tmp_path / "store", manifest, figures(reference.result), [VAL_LOSS_GATE],
                             _training_figures, "training_sane")
    assert trained.passed and trained.downstream_ran, trained.description

    result = train(build_model(TINY, seed=0), corpus.train, corpus.val, did_not_learn)
    untrained = run_gate_check(tmp_path / "store", manifest, figures(result), [VAL_LOSS_GATE],
                               _training_figures, "training_sane")
    assert not untrained.passed and not untrained.downstream_ran
    assert f"> unigram baseline {result.baseline_val_losses['unigram']:.4g} + max_delta -0.3" in untrained.description


def test_no_override_passes_a_checkpoint_whose_loss_is_not_finite(tmp_path) -> None:
    """A reviewer may override a val loss over its gate, never a run that diverged to NaN."""
    manifest = manifest_with_gates(GATES)
    store = tmp_path / "store"
    record_override(open_store(str(store)), VAL_LOSS_GATE, "model", "xs", SHA256, "ana", "reviewed the curves")
    over = {"initial_loss": 8.3, "final_train_loss": 6.0, "final_val_loss": 9.0, "unigram_val_loss": 6.6}
    assert run_gate_check(store, manifest, over, [VAL_LOSS_GATE], _training_figures).passed  # overridden
    diverged = run_gate_check(store, manifest, {**over, "final_train_loss": math.nan}, [VAL_LOSS_GATE],
                              _training_figures)
    assert not diverged.passed and not diverged.downstream_ran
    assert "a loss is not finite" in diverged.description

