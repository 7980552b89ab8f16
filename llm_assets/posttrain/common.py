"""What every trl stage shares: its config from a `TrainerRecipe`, callbacks that hand each
checkpoint and log line to the caller, resume, and the record of the run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm_assets.hf_models import training_device
from llm_assets.manifest import TrainerRecipe
from llm_assets.pretrain.distributed import barrier, dist_info
from llm_assets.pretrain.loop import resolve_precision
from llm_assets.tracing import phase

# peft and trl read the model's is_gradient_checkpointing, which transformers 5 renamed; pinned
# versions, so the warning carries no news (pytest needs the same filter in pyproject.toml).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

OnCheckpoint = Callable[[Path, int], None]
OnLog = Callable[[dict[str, Any]], None]

# final_train_loss is the mean of this many last steps, as in the pretraining loop.
LOSS_WINDOW = 10


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float  # the step's train loss (mean over its gradient-accumulation micro-batches)
    # The rest of trl's log line (learning_rate, grad_norm, the stage's own figures) and
    # tokens_per_second (ThroughputCallback).
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalLog:
    step: int
    metrics: dict[str, float]  # trl's eval_* figures on the val rows


@dataclass(frozen=True)
class TrainingRun:
    """What trl's training did, from step 0 (a resumed run's history includes the steps before it)."""

    history: list[StepLog]
    evals: list[EvalLog]  # every eval_every steps; none when eval_every is 0
    final_train_loss: float  # mean loss of the last LOSS_WINDOW steps
    steps_done: int
    resumed_from_step: int | None
    train_samples: int  # rows trl trains on, after its own length filtering
    train_seconds: float  # wall time of this call's trainer.train()
    steps_per_second: float  # steps this call trained / train_seconds
    precision: Literal["fp32", "bf16"]
    processes: int  # the ranks that trained it (torchrun's world size; 1 in the step's own process)


def per_process_batch(recipe: TrainerRecipe, processes: int) -> int:
    """Each rank's share of the recipe's batch: `batch_size` is the batch of one micro-step over
    all ranks, so that the process count changes how a stage runs, not what it trains."""
    if recipe.batch_size % processes:
        raise ValueError(f"batch_size {recipe.batch_size} cannot be split over {processes} training processes: set "
                         f"batch_size to a multiple of {processes}, or compute.training.nproc_per_node to a divisor of "
                         f"{recipe.batch_size}")
    return recipe.batch_size // processes


def config_kwargs(recipe: TrainerRecipe, work_dir: Path, *, seed: int) -> dict[str, Any]:
    """The arguments every trl config takes from the recipe; each stage adds its own. Under
    torchrun (a process group joined) each rank takes its share of the batch."""
    device = training_device()
    checkpoints = recipe.checkpoint_every > 0
    return {
        "output_dir": str(work_dir),
        "max_steps": recipe.steps,
        "per_device_train_batch_size": per_process_batch(recipe, dist_info().world_size),
        "per_device_eval_batch_size": recipe.batch_size,
        "gradient_accumulation_steps": recipe.grad_accum,
        "learning_rate": recipe.learning_rate,
        "lr_scheduler_type": "cosine",
        # transformers 5 dropped warmup_ratio: a warmup_steps below 1 is the ratio of max_steps.
        "warmup_steps": recipe.warmup_ratio,
        "weight_decay": recipe.weight_decay,
        "eval_strategy": "steps" if recipe.eval_every else "no",
        **({"eval_steps": recipe.eval_every} if recipe.eval_every else {}),
        "save_strategy": "steps" if checkpoints else "no",
        **({"save_steps": recipe.checkpoint_every} if checkpoints else {}),
        # Optimizer, scheduler and RNG states go into every checkpoint, so that a resumed run goes on
        # where the interrupted one stopped.
        "save_only_model": False,
        # Each checkpoint is handed to on_checkpoint (committed to the store) as it is written; the
        # work dir keeps only the newest, which a long run's disk would not hold many of.
        "save_total_limit": 1,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": device.type == "cpu",
        # trl's configs default bf16 to True whatever the device: it is always set here.
        "bf16": resolve_precision(recipe.precision, device) == "bf16",
        # trl turns it on by default (as gradient_checkpointing, a name transformers 5 deprecates): it
        # costs ~20% more compute to save memory that small models do not need.
        "activation_checkpointing": False,
        "seed": seed,
        "data_seed": seed,
        # Data loading in the main process: its shuffling RNG is the one checkpoints save and restore.
        "dataloader_num_workers": 0,
    }


class CheckpointCallback(TrainerCallback):
    """Calls on_checkpoint(path, step) on the main process once each checkpoint-N directory is
    complete (weights, optimizer, scheduler, RNG and trainer state)."""

    def __init__(self, on_checkpoint: OnCheckpoint):
        self.handler = on_checkpoint

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Every rank writes its own RNG state into the directory, and transformers does not wait
        # for them before this hook: rank 0 commits it once all have.
        barrier()
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.handler(path, state.global_step)


class LogCallback(TrainerCallback):
    """Calls on_log({"step": N, **trl's log line}) on the main process for about twenty of a run's
    training lines (every steps/20th, as pretraining reports) and for every other line (evaluation,
    the closing summary). trl logs every step for the loss curve; each line handed on becomes an
    event in the run's log, a database commit each."""

    def __init__(self, on_log: OnLog):
        self.handler = on_log  # not self.on_log, which would shadow the hook

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and logs):
            return
        every = max(1, state.max_steps // 20)
        if "loss" not in logs or state.global_step % every == 0 or state.global_step == state.max_steps:
            self.handler({"step": state.global_step, **logs})


class ThroughputCallback(TrainerCallback):
    """tokens_per_second of every train log line: the tokens trl counted since the line before
    (its `num_tokens` is a running total) over the wall time of the steps between them. Time spent
    evaluating or saving checkpoints after a line is left out: the next interval starts when the
    next step does. The first line after a resume has none: trl's total does not always go on from
    the checkpoint's."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}  # step -> tokens per second
        self._tokens: float | None = None  # the running total at the line before
        self._since: float | None = None  # when the first step after that line began

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._tokens = 0.0 if state.global_step == 0 else None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or "num_tokens" not in logs or self._since is None:
            return
        seconds = time.perf_counter() - self._since
        if self._tokens is not None and seconds > 0:
            self.rates[state.global_step] = (logs["num_tokens"] - self._tokens) / seconds
        self._tokens, self._since = float(logs["num_tokens"]), None


def callbacks(on_checkpoint: OnCheckpoint | None, on_log: OnLog | None) -> list[TrainerCallback]:
    return ([CheckpointCallback(on_checkpoint)] if on_checkpoint else []) + ([LogCallback(on_log)] if on_log else [])


def log_line(entry: dict[str, Any]) -> str:
    """One of trl's log lines (see LogCallback) as the run's log shows it: its figures but the epoch."""
    return ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if isinstance(v, float) and k != "epoch")


def run_trainer(trainer: Trainer, recipe: TrainerRecipe, resume_from: Path | None) -> TrainingRun:
    """Run `trainer` to recipe.steps, from step 0 or from the checkpoint-N directory `resume_from`
    (written by a run of the same recipe: its weights, optimizer, schedule, RNG and data position)."""
    resumed_from_step = _checkpoint_step(resume_from, recipe) if resume_from is not None else None
    # With disable_tqdm, transformers prints every log line to stdout instead of drawing a progress
    # bar; the caller gets those lines from on_log.
    trainer.remove_callback(PrinterCallback)
    throughput = ThroughputCallback()
    trainer.add_callback(throughput)
    started = time.perf_counter()
    with phase("train"):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    seconds = time.perf_counter() - started

    history = [StepLog(step=log["step"], loss=log["loss"],
                       metrics={**{k: v for k, v in log.items() if k not in ("step", "loss")},
                                **({"tokens_per_second": throughput.rates[log["step"]]}
                                   if log["step"] in throughput.rates else {})})
               for log in trainer.state.log_history if "loss" in log]
    evals = [EvalLog(step=log["step"], metrics={k: v for k, v in log.items() if k.startswith("eval_")})
             for log in trainer.state.log_history if any(k.startswith("eval_") for k in log)]
    losses = [record.loss for record in history[-LOSS_WINDOW:]]
    final_train_loss = sum(losses) / len(losses)
    if not math.isfinite(final_train_loss):
        raise FloatingPointError(f"the train loss is {final_train_loss}: lower the learning rate "
                                 f"({recipe.learning_rate}) or raise warmup_ratio")
    steps_done = trainer.state.global_step
    return TrainingRun(
        history=history,
        evals=evals,
        final_train_loss=final_train_loss,
        steps_done=steps_done,
        resumed_from_step=resumed_from_step,
        train_samples=len(trainer.train_dataset),
        train_seconds=seconds,
        steps_per_second=(steps_done - (resumed_from_step or 0)) / seconds,
        precision="bf16" if trainer.args.bf16 else "fp32",
        processes=trainer.args.world_size,
    )


def _checkpoint_step(checkpoint: Path, recipe: TrainerRecipe) -> int:
    """The step a checkpoint was written at, once it is known to come from a run of this recipe
    (as far as trainer_state.json tells: its steps and batch size)."""
    state_file = checkpoint / TRAINER_STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a trl checkpoint (no {TRAINER_STATE_NAME}): resume_from takes a "
                                f"{PREFIX_CHECKPOINT_DIR}-N directory written by a run of this stage")
    state = TrainerState.load_from_json(str(state_file))
    if state.max_steps != recipe.steps:
        raise ValueError(f"cannot resume from {checkpoint}: it was written by a run of another recipe (steps: "
                         f"checkpoint {state.max_steps}, recipe {recipe.steps}); resume with that recipe, or start "
                         "afresh")
    # trainer_state.json holds one rank's batch: the recipe's over the processes of the run that wrote it.
    processes = dist_info().world_size
    if state.train_batch_size != per_process_batch(recipe, processes):
        raise ValueError(f"cannot resume from {checkpoint}: its run gave each process {state.train_batch_size} rows "
                         f"a micro-batch, this one splits batch_size {recipe.batch_size} over {processes} process(es); "
                         "resume with that recipe and as many training processes (compute.training.nproc_per_node), "
                         "or start afresh")
    return state.global_step
