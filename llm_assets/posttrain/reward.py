"""The reward model: trl's RewardTrainer fits a one-logit sequence-classification head on the SFT
model to preference pairs (Bradley-Terry: −log σ(score(chosen) − score(rejected)))."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from llm_assets.hf_models import export_model, load_tokenizer
from llm_assets.manifest import RewardRecipe
from llm_assets.posttrain.common import OnCheckpoint, OnLog, TrainingRun, callbacks, config_kwargs, run_trainer
from llm_assets.posttrain.rows import PAIR_KEYS, Rows, in_template, records
from llm_assets.posttrain.scoring import Pairwise, reward_pairwise
from llm_assets.tracing import phase


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    training: TrainingRun
    held_out: Pairwise  # score(prompt + chosen) vs score(prompt + rejected) on the val pairs
    held_out_before: Pairwise  # the same, with the freshly initialised head, before training
    wall_seconds: float  # the whole call: loading, training, figures and export


def run_reward(sft_dir: Path, train_pairs: Rows, val_pairs: Rows, recipe: RewardRecipe, out_dir: Path,
               work_dir: Path, *, seed: int, resume_from: Path | None = None,
               on_checkpoint: OnCheckpoint | None = None, on_log: OnLog | None = None) -> RewardResult:
    """Train a reward model from the SFT model in `sft_dir` on preference pairs; export it to `out_dir`.

    `out_dir` gets an HF directory that AutoModelForSequenceClassification loads (one logit, the
    reward, read at the last non-pad token) with the tokenizer. Pairs longer than max_length are
    left out of training by trl. Checkpoints go to `work_dir` (see `common.run_trainer`).
    """
    started = time.perf_counter()
    train_records = records(train_pairs, PAIR_KEYS, "reward train")
    val_records = records(val_pairs, PAIR_KEYS, "reward val")
    with phase("load"):
        tokenizer = load_tokenizer(sft_dir)
        train_records, val_records = in_template(train_records, tokenizer, "reward train"), in_template(
            val_records, tokenizer, "reward val")
        trainer = RewardTrainer(
            # From the path, trl builds AutoModelForSequenceClassification with num_labels=1, its new
            # score head initialised from the seed, pad_token_id set, and no warning about that head.
            model=str(sft_dir),
            args=RewardConfig(**config_kwargs(recipe, work_dir, seed=seed), max_length=recipe.max_length),
            train_dataset=Dataset.from_list(train_records),
            eval_dataset=Dataset.from_list(val_records) if recipe.eval_every else None,
            processing_class=tokenizer,
            callbacks=callbacks(on_checkpoint, on_log),
        )
    before = reward_pairwise(trainer.model, tokenizer, val_records, max_length=recipe.max_length,
                             batch_size=recipe.batch_size)
    run = run_trainer(trainer, recipe, resume_from)

    after = reward_pairwise(trainer.model, tokenizer, val_records, max_length=recipe.max_length,
                            batch_size=recipe.batch_size)
    if trainer.is_world_process_zero():  # under torchrun every rank holds the same weights
        export_model(trainer.model, tokenizer, out_dir)
    return RewardResult(training=run, held_out=after, held_out_before=before,
                        wall_seconds=time.perf_counter() - started)
