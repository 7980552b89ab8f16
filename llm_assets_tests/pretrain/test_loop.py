"""The training loop: it learns, its schedule, clipping, accumulation, determinism and exact resume."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from llm_assets.manifest import PretrainRecipe
from llm_assets.pretrain import TrainConfig, build_model, lr_at, resolve_precision, train
from llm_assets.pretrain.checkpoint import restore_rng_state
from llm_assets_tests.pretrain.tiny import BASE, TINY, UNIFORM_LOSS, losses


def test_loss_falls_and_val_loss_is_reported(reference) -> None:
    result = reference.result
    first = result.history[0]
    assert abs(first.loss - UNIFORM_LOSS) < 0.1  # an untrained model is near uniform
    assert result.final_train_loss < 0.45 * UNIFORM_LOSS
    assert result.final_train_loss == pytest.approx(sum(losses(result)[-10:]) / 10)
    evaluated = [(r.step, r.val_loss) for r in result.history if r.val_loss is not None]
    assert [step for step, _ in evaluated] == [20, 40, 60]
    assert evaluated[0][1] > evaluated[-1][1] == result.final_val_loss
    assert math.isfinite(result.final_val_loss) and result.final_val_loss < 0.45 * UNIFORM_LOSS
    assert result.steps_done == 60 and result.resumed_from_step is None and result.precision == "fp32"
    assert result.tokens_seen == 60 * 8 * 32 == result.history[-1].tokens_seen
    assert [r.tokens_seen for r in result.history[:2]] == [256, 512]
    assert result.tokens_per_second > 0


def test_warmup_then_cosine_schedule() -> None:
    cfg = TrainConfig(steps=101, batch_size=1, seq_len=8, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 4) == pytest.approx(0.5)
    assert lr_at(cfg, 9) == lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) > lr_at(cfg, s + 1) for s in range(10, 100))
    no_warmup = cfg.replace(warmup_steps=0)
    assert lr_at(no_warmup, 0) == 1.0


def test_the_loop_uses_the_schedule(reference) -> None:
    assert [r.lr for r in reference.result.history] == pytest.approx([lr_at(BASE, s) for s in range(BASE.steps)])


def test_clipping_bounds_the_gradient_norm_the_optimizer_sees(corpus) -> None:
    seen: list[float] = []

    def measure(optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    hook = register_optimizer_step_pre_hook(measure)
    try:
        clipped = train(build_model(TINY, seed=0), corpus.train, None,
                        BASE.replace(steps=6, grad_clip=0.05))
        clipped_seen, seen[:] = list(seen), []
        unclipped = train(build_model(TINY, seed=0), corpus.train, None,
                          BASE.replace(steps=6, grad_clip=0))
    finally:
        hook.remove()
    assert all(r.grad_norm > 0.05 for r in clipped.history)  # clipping had work to do...
    assert clipped_seen == pytest.approx([0.05] * 6, rel=1e-4)  # ...and did it
    assert seen == pytest.approx([r.grad_norm for r in unclipped.history], rel=1e-5)  # 0: not clipped


def test_two_micro_batches_of_half_size_match_one_full_batch(corpus, reference) -> None:
    cfg = BASE.replace(batch_size=4, grad_accum=2)
    result = train(build_model(TINY, seed=0), corpus.train, corpus.val, cfg)
    assert result.tokens_seen == reference.result.tokens_seen
    assert losses(result) == pytest.approx(losses(reference.result), rel=1e-4)
    # Adam hides a gradient off by a constant factor from the losses; the norm shows it.
    norms = lambda r: [h.grad_norm for h in r.history]  # noqa: E731
    assert norms(result) == pytest.approx(norms(reference.result), rel=1e-3)
    assert result.final_val_loss == pytest.approx(reference.result.final_val_loss, rel=1e-4)


def test_same_seed_same_history_other_seed_other_history(corpus, reference) -> None:
    again = train(build_model(TINY, seed=0), corpus.train, corpus.val, BASE)
    fields = lambda result: [(r.step, r.loss, r.lr, r.grad_norm, r.val_loss) for r in result.history]  # noqa: E731
    assert fields(again) == fields(reference.result)
    other = BASE.replace(seed=1, steps=5)
    assert losses(train(build_model(TINY, seed=1), corpus.train, None, other)) != losses(reference.result)[:5]


def test_resume_continues_exactly_where_the_run_stopped(corpus, reference) -> None:
    step_20 = reference.checkpoint_dir / "step_00000020"
    # Another init seed: everything must come from the checkpoint.
    resumed = train(build_model(TINY, seed=123), corpus.train, corpus.val, BASE, resume_from=step_20)
    assert resumed.resumed_from_step == 20 and resumed.steps_done == 60
    assert [r.step for r in resumed.history] == list(range(1, 61))
    # CPU fp32 in one process: bit-identical, not merely close.
    assert losses(resumed) == losses(reference.result)
    assert [r.lr for r in resumed.history] == [r.lr for r in reference.result.history]
    assert resumed.final_val_loss == reference.result.final_val_loss
    assert resumed.final_train_loss == reference.result.final_train_loss
    for (name, a), b in zip(reference.model.state_dict().items(), resumed_model_state(corpus, step_20)):
        assert torch.equal(a, b), name


def resumed_model_state(corpus, checkpoint: Path) -> list[torch.Tensor]:
    model = build_model(TINY, seed=5)
    train(model, corpus.train, None, BASE.replace(eval_every=0), resume_from=checkpoint)
    return list(model.state_dict().values())


def test_resume_restores_the_rng_states(corpus, reference) -> None:
    step_20 = reference.checkpoint_dir / "step_00000020"
    draw = lambda: (random.random(), np.random.random(), torch.rand(1).item())  # noqa: E731
    restore_rng_state(torch.load(step_20 / "trainer.pt", weights_only=True)["rng"][0])
    expected = draw()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    drawn = []
    # This model draws no random numbers while training, so after step 21 the states are the saved ones.
    train(build_model(TINY, seed=0), corpus.train, None, BASE.replace(eval_every=0),
          resume_from=step_20, on_step=lambda record: drawn.append(draw()) if record.step == 21 else None)
    assert drawn == [expected]


def test_resume_refuses_a_config_that_changes_the_trajectory(corpus, reference) -> None:
    step_20 = reference.checkpoint_dir / "step_00000020"
    with pytest.raises(ValueError, match=r"learning_rate: checkpoint 0.01, now 0.02.*global batch"):
        train(build_model(TINY, seed=0), corpus.train, None,
              BASE.replace(learning_rate=2e-2, batch_size=4), resume_from=step_20)


def test_a_fresh_run_refuses_a_directory_with_checkpoints(corpus, reference) -> None:
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(build_model(TINY, seed=0), corpus.train, None, BASE, checkpoint_dir=reference.checkpoint_dir)


def test_bf16_autocast_on_request(corpus, reference) -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    result = train(build_model(TINY, seed=0), corpus.train, None, BASE.replace(steps=5, precision="bf16"))
    assert result.precision == "bf16"
    # Same batches and init, lower-precision matmuls: close to fp32 but not equal.
    assert losses(result) == pytest.approx(losses(reference.result)[:5], rel=0.05)
    assert losses(result) != losses(reference.result)[:5]


def test_config_from_the_manifest_recipe() -> None:
    recipe = PretrainRecipe(steps=100, batch_size=4, grad_accum=2, seq_len=128, learning_rate=3e-4, warmup_steps=10)
    cfg = TrainConfig.from_recipe(recipe, eval_every=25, precision="bf16")
    assert (cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.seq_len, cfg.learning_rate, cfg.warmup_steps) == (
        100, 4, 2, 128, 3e-4, 10)
    assert cfg.eval_every == 25 and cfg.precision == "bf16" and cfg.min_lr_ratio == 0.1
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg, "the config survives JSON"
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(steps=5, batch_size=1, seq_len=8, learning_rate=1.0, warmup_steps=6)
