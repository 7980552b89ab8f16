"""Preference alignment of the SFT model: DPO against the SFT model as reference, or GRPO with the
reward model scoring groups of sampled completions (and a KL pull toward the SFT model)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from llm_assets.hf_models import export_model, load_model, load_tokenizer
from llm_assets.manifest import PolicyRecipe
from llm_assets.posttrain.common import OnCheckpoint, OnLog, TrainingRun, callbacks, config_kwargs, run_trainer
from llm_assets.posttrain.rows import PAIR_KEYS, Rows, in_template, records
from llm_assets.posttrain.scoring import Pairwise, implicit_reward_pairwise, policy_kl, reward_scores
from llm_assets.tracing import phase


@dataclass(frozen=True, kw_only=True)
class PolicyResult:
    training: TrainingRun
    algorithm: Literal["dpo", "grpo"]
    kl_nats_per_sequence: float  # scoring.policy_kl(policy, SFT model) on the first kl_prompts val pairs
    kl_rows: int  # how many val pairs that was measured on
    # DPO only: β·log(π/π_ref) ranking chosen vs rejected on the val pairs. Before training it is
    # 0 for every completion (the policy is the reference), an accuracy of 0.5.
    implicit_reward: Pairwise | None
    wall_seconds: float  # the whole call: loading, training, figures and export


def run_policy(sft_dir: Path, reward_dir: Path | None, train_pairs: Rows, val_pairs: Rows, recipe: PolicyRecipe,
               out_dir: Path, work_dir: Path, *, seed: int, resume_from: Path | None = None,
               on_checkpoint: OnCheckpoint | None = None, on_log: OnLog | None = None) -> PolicyResult:
    """Align the SFT model in `sft_dir` with recipe.algorithm; export the policy to `out_dir`.

    DPO trains on the preference pairs; GRPO samples completions of their prompts and needs the
    reward model in `reward_dir`. `out_dir` gets a plain HF causal LM directory with the tokenizer.
    Checkpoints go to `work_dir` (see `common.run_trainer`).
    """
    started = time.perf_counter()
    if recipe.algorithm == "grpo":
        _check_grpo(recipe, reward_dir)
    train_records = records(train_pairs, PAIR_KEYS, "policy train")
    val_records = records(val_pairs, PAIR_KEYS, "policy val")
    with phase("load"):  # the tokenizer, the policy, its reference (and the reward model for GRPO)
        tokenizer = load_tokenizer(sft_dir)
        train_records, val_records = in_template(train_records, tokenizer, "policy train"), in_template(
            val_records, tokenizer, "policy val")
        policy = load_model(AutoModelForCausalLM, sft_dir, tokenizer)
        trainer_callbacks = callbacks(on_checkpoint, on_log)
        if recipe.algorithm == "dpo":
            trainer = _dpo(sft_dir, policy, tokenizer, train_records, val_records, recipe, work_dir, seed,
                           trainer_callbacks)
        else:
            trainer = _grpo(reward_dir, policy, tokenizer, train_records, val_records, recipe, work_dir, seed,
                            trainer_callbacks)
    run = run_trainer(trainer, recipe, resume_from)

    # The trainer's frozen reference: the SFT model, loaded from sft_dir.
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    kl_rows = val_records[: recipe.kl_prompts]
    kl = policy_kl(trainer.model, reference, tokenizer, kl_rows, max_length=recipe.max_length,
                   batch_size=recipe.batch_size)
    implicit_reward = (implicit_reward_pairwise(trainer.model, reference, tokenizer, val_records, beta=recipe.beta,
                                                max_length=recipe.max_length, batch_size=recipe.batch_size)
                       if recipe.algorithm == "dpo" else None)
    if trainer.is_world_process_zero():  # under torchrun every rank holds the same weights
        export_model(trainer.model, tokenizer, out_dir)
    return PolicyResult(training=run, algorithm=recipe.algorithm, kl_nats_per_sequence=kl, kl_rows=len(kl_rows),
                        implicit_reward=implicit_reward, wall_seconds=time.perf_counter() - started)


def _dpo(sft_dir: Path, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
         train_records: list[dict[str, str]], val_records: list[dict[str, str]], recipe: PolicyRecipe,
         work_dir: Path, seed: int, trainer_callbacks: list[TrainerCallback]) -> Trainer:
    return DPOTrainer(
        model=policy,
        ref_model=load_model(AutoModelForCausalLM, sft_dir, tokenizer),
        args=DPOConfig(**config_kwargs(recipe, work_dir, seed=seed), beta=recipe.beta, max_length=recipe.max_length),
        train_dataset=Dataset.from_list(train_records),
        eval_dataset=Dataset.from_list(val_records) if recipe.eval_every else None,
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
    )


def _grpo(reward_dir: Path, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
          train_records: list[dict[str, str]], val_records: list[dict[str, str]], recipe: PolicyRecipe,
          work_dir: Path, seed: int, trainer_callbacks: list[TrainerCallback]) -> Trainer:
    spec = recipe.grpo
    reward_tokenizer = load_tokenizer(reward_dir)
    reward_model = load_model(AutoModelForSequenceClassification, reward_dir, reward_tokenizer)
    if reward_model.config.num_labels != 1:
        raise ValueError(f"the model in {reward_dir} has {reward_model.config.num_labels} labels; a reward model has "
                         "one (the reward)")
    config = GRPOConfig(
        # An eval batch of one group: trl requires the eval batch to hold whole groups.
        **{**config_kwargs(recipe, work_dir, seed=seed), "per_device_eval_batch_size": spec.num_generations},
        beta=recipe.beta,
        num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length,
        temperature=spec.temperature,
    )
    return GRPOTrainer(
        model=policy,
        reward_funcs=_reward_model_function(reward_model, reward_tokenizer, recipe),
        args=config,
        train_dataset=_prompts(train_records),
        eval_dataset=_prompts(val_records) if recipe.eval_every else None,
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
    )


def _check_grpo(recipe: PolicyRecipe, reward_dir: Path | None) -> None:
    """What GRPO needs, checked before any model is loaded."""
    if reward_dir is None:
        raise ValueError("policy algorithm grpo needs reward_dir: the reward model scores its completions")
    # trl's batch_size counts completions; each optimizer step samples whole groups of them.
    completions = recipe.batch_size * recipe.grad_accum
    if completions % recipe.grpo.num_generations:
        raise ValueError(f"GRPO: batch_size × grad_accum = {completions} completions per step is not a multiple of "
                         f"grpo.num_generations = {recipe.grpo.num_generations}: each prompt's group is sampled and "
                         "scored within one step")


def _reward_model_function(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                           recipe: PolicyRecipe) -> Callable[..., list[float]]:
    """The reward model as a trl reward function.

    trl also takes the model itself as a reward function, but then scores prompt + completion as
    decoded (without eos), while RewardTrainer trained it on prompt + completion + eos: the score
    would be read at a position it was never trained on. This scores what it was trained on.
    """
    def reward_model(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return reward_scores(model, tokenizer, prompts, completions, max_length=recipe.max_length,
                             batch_size=recipe.batch_size)

    return reward_model


def _prompts(pairs: list[dict[str, str]]) -> Dataset:
    # Only the prompt: trl hands every other column to the reward functions.
    return Dataset.from_list([{"prompt": pair["prompt"]} for pair in pairs])
