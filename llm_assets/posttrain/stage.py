"""One trl stage's work as plain data: what it trains from and on, and the figures it returns.

The sft_model, reward_model and policy assets describe their work as a `StageWork` and hand it to
`run_stage`, in the step's own process or, when compute.training asks for several processes, in
every rank of a worker under torchrun (`job.py`): the same function either way. It returns plain
figures (numbers, strings, lists), which Dagster Pipes carries back from rank 0 unchanged; the
asset draws the loss curve from its points and turns the step metrics into their metadata type
(a rank draws nothing: matplotlib's import alone is a second of every rank's start).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llm_assets.manifest import PolicyRecipe, RewardRecipe, SftRecipe
from llm_assets.posttrain.dataset_files import read_dataset
from llm_assets.tracking import STEP_METRICS
from llm_assets.worker import WorkerSpec

if TYPE_CHECKING:
    from llm_assets.posttrain.common import OnCheckpoint, OnLog, TrainingRun

Stage = Literal["sft", "reward", "policy"]
RECIPES = {"sft": SftRecipe, "reward": RewardRecipe, "policy": PolicyRecipe}
# The figure that names where SFT left its LoRA adapters (under the work dir): the asset stores
# them as their own artifact and does not show the path.
ADAPTER_DIR = "adapter_dir"
LOSS_CURVE = "loss_curve"  # [[step, loss], ...]; the asset shows it as an inline plot


class StageWork(WorkerSpec):
    stage: Stage
    recipe: dict[str, Any]  # the stage's recipe from the manifest, as JSON
    seed: int
    title: str  # of the loss curve
    model_dir: str  # where training starts: the starting model (sft), the SFT model (reward, policy)
    dataset_dir: str  # sft_dataset (sft), preference_dataset (reward, policy)
    reward_dir: str | None = None  # the reward model: GRPO scores its completions with it
    cai_dir: str | None = None  # cai_dataset, when the policy trains on its pairs


def training_figures(run: TrainingRun) -> dict[str, Any]:
    """What every trl stage shows: steps, losses, throughput and the loss curve."""
    return {
        "steps": run.steps_done,
        "resumed_from_step": run.resumed_from_step if run.resumed_from_step is not None else -1,
        "initial_train_loss": round(run.history[0].loss, 4) if run.history else float("nan"),
        "final_train_loss": round(run.final_train_loss, 4),
        "train_samples": run.train_samples,
        "steps_per_second": round(run.steps_per_second, 3),
        "precision": run.precision,
        "processes": run.processes,
        LOSS_CURVE: [[r.step, r.loss] for r in run.history],
        # Per step, what trl logged (learning rate, grad norm, ...) and its val figures: the tracker's curves.
        STEP_METRICS: [{"step": r.step, "loss": r.loss, **r.metrics} for r in run.history]
                      + [{"step": e.step, **e.metrics} for e in run.evals],
    }


def run_stage(work: StageWork, out: Path, work_dir: Path, resume_from: Path | None,
              on_checkpoint: OnCheckpoint | None, on_log: OnLog | None) -> dict[str, Any]:
    """Train `work`'s stage, export the model to `out` (checkpoints under `work_dir`, see
    `common.run_trainer`), and return its figures. Every torchrun rank calls this; rank 0 writes."""
    # Each trainer loads here, and only the one this stage runs: the assets that describe the work
    # are part of the definitions, and each rank of a worker imports what it trains with.
    recipe = RECIPES[work.stage].model_validate(work.recipe)
    model_dir, dataset_dir = Path(work.model_dir), Path(work.dataset_dir)
    progress = {"seed": work.seed, "resume_from": resume_from, "on_checkpoint": on_checkpoint, "on_log": on_log}
    if work.stage == "sft":
        from llm_assets.posttrain.sft import run_sft

        rows_train, rows_val = read_dataset(dataset_dir)
        sft = run_sft(model_dir, rows_train, rows_val, recipe, out, work_dir, **progress)
        return {**training_figures(sft.training),
                "val_loss": round(sft.val_loss, 4), "base_val_loss": round(sft.base_val_loss, 4),
                "val_rows": sft.val_rows, "method": sft.method, "parameters": sft.parameters,
                "trainable_parameters": sft.trainable_parameters,
                **({ADAPTER_DIR: str(sft.adapter_dir)} if sft.adapter_dir is not None else {})}
    pairs_train, pairs_val = read_dataset(dataset_dir)
    if work.stage == "reward":
        from llm_assets.posttrain.reward import run_reward

        reward = run_reward(model_dir, pairs_train, pairs_val, recipe, out, work_dir, **progress)
        return {**training_figures(reward.training),
                "accuracy": round(reward.held_out.accuracy, 4),
                "mean_margin": round(reward.held_out.mean_margin, 4),
                "accuracy_before_training": round(reward.held_out_before.accuracy, 4),
                "val_pairs": reward.held_out.pairs}
    from llm_assets.posttrain.cai import read_cai_pairs
    from llm_assets.posttrain.policy import run_policy

    # Val pairs (the KL, the implicit reward) are preference_dataset's whatever the policy trains on.
    pairs_train = ((pairs_train if "preference_dataset" in recipe.preferences else [])
                   + (read_cai_pairs(Path(work.cai_dir)) if work.cai_dir is not None else []))
    reward_dir = Path(work.reward_dir) if work.reward_dir is not None else None
    policy = run_policy(model_dir, reward_dir, pairs_train, pairs_val, recipe, out, work_dir, **progress)
    implicit = policy.implicit_reward
    return {**training_figures(policy.training),
            "algorithm": policy.algorithm, "beta": recipe.beta,
            "kl_nats_per_sequence": round(policy.kl_nats_per_sequence, 6), "kl_rows": policy.kl_rows,
            **({"implicit_reward_accuracy": round(implicit.accuracy, 4)} if implicit else {})}
