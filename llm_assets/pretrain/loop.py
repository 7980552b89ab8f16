"""The pretraining loop: AdamW, warmup + cosine LR, gradient accumulation, clipping, bf16 autocast,
periodic evaluation and checkpoints, exact resume, data parallelism with DDP or FSDP2.

Read `train` top to bottom; everything else here is a small helper it calls.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from llm_assets.manifest import Precision, PretrainRecipe
from llm_assets.pretrain.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    remove_temp_dirs,
    restore_rng_state,
    save_checkpoint,
)
from llm_assets.pretrain.data import TokenBatches, TokenData
from llm_assets.pretrain.distributed import (
    DistInfo,
    barrier,
    dist_info,
    full_model,
    full_optimizer_state,
    gather_objects,
    is_sharded,
    load_full_optimizer_state,
    mean_across_ranks,
    shard_model,
)


class TrainConfig(PretrainRecipe):
    """The pretraining recipe (the manifest's `stages.pretrain`, which declares and validates its
    fields) plus what a run adds to it."""

    seed: int = 0  # data order (and, by convention, the model init)
    betas: tuple[float, float] = (0.9, 0.95)
    loss_window: int = Field(10, gt=0)  # final_train_loss is the mean of this many last steps
    # With several processes: DDP replicas or FSDP2 shards (the manifest's compute.training.parallelism).
    parallelism: Literal["ddp", "fsdp"] = "ddp"

    @classmethod
    def from_recipe(cls, recipe: PretrainRecipe, **overrides: Any) -> TrainConfig:
        """The manifest's pretrain recipe, plus the fields it does not carry (as keyword arguments)."""
        return cls.model_validate(recipe.model_dump() | overrides)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`, validated like the original."""
        return type(self).model_validate(self.model_dump() | changes)


# What a resumed run must share with the run that wrote the checkpoint for its steps to be the
# ones the uninterrupted run would have taken. Eval and checkpoint cadence may change; so may
# batch_size, grad_accum and the world size, as long as the global batch stays the same.
_TRAJECTORY_FIELDS = ("steps", "seq_len", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                      "betas", "grad_clip", "seed")


@dataclass(frozen=True)
class StepRecord:
    step: int  # optimizer steps done, counting this one (1-based)
    loss: float  # mean train loss of the step's global batch (averaged over ranks)
    lr: float  # the LR this step's update used
    grad_norm: float  # global grad norm before clipping
    tokens_seen: int  # all ranks, since step 0
    seconds: float  # wall time of this step's forward/backward/update (not eval or checkpoint)
    val_loss: float | None = None  # set on evaluation steps


@dataclass(frozen=True)
class TrainResult:
    final_train_loss: float  # mean over the last `loss_window` steps
    final_val_loss: float | None  # None without val data
    history: list[StepRecord]  # every step since step 0, including steps restored from the checkpoint
    tokens_seen: int
    tokens_per_second: float  # tokens trained by this call / the seconds of its steps
    steps_done: int
    resumed_from_step: int | None
    precision: Literal["fp32", "bf16"]
    checkpoints: list[Path] = field(default_factory=list)  # committed by this call (rank 0)
    # Val losses of reference models on the same val windows, what the gate on final_val_loss is
    # measured from: "untrained" (this model at initialisation), "unigram" (token frequencies of
    # the training data). Empty without val data.
    baseline_val_losses: dict[str, float] = field(default_factory=dict)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The LR of the update made at optimizer step `step` (0-based).

    Linear warmup from learning_rate/warmup_steps up to learning_rate over the first warmup_steps
    updates, then a cosine from learning_rate down to learning_rate × min_lr_ratio, reached
    exactly at the last update.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """"auto" is bf16 on a CUDA device that supports it and fp32 elsewhere.

    On CPU, bf16 autocast speeds training up only where the CPU has bf16 matrix units (AMX), and
    it changes the numerics; CPU runs are mostly tests and debugging, which want the fp32
    reference numbers. Ask for "bf16" explicitly to use it on such a CPU.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return precision


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices (weights, embeddings) but not vectors (norm gains, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=device.type == "cuda")


def train(
    model: PreTrainedModel,
    train_data: TokenData,
    val_data: TokenData | None,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> TrainResult:
    """Train `model` (already on its device) for `cfg.steps` optimizer steps.

    Under torchrun (after `maybe_init_distributed()`) every rank calls this with the same
    arguments: the model is wrapped in DDP, or sharded in place with FSDP2 when `cfg.parallelism`
    is "fsdp" (it stays sharded: `distributed.full_model` gathers it whole), each rank trains on
    its slice of every global batch (batch_size × grad_accum × world_size sequences), logged
    losses are averaged over ranks, and only rank 0 writes checkpoints and calls `on_step` /
    `on_checkpoint`.

    Checkpoints go to `checkpoint_dir` every `checkpoint_every` steps and after the last step;
    `on_checkpoint(path, step)` runs after each commit. `resume_from` (a checkpoint directory,
    e.g. `latest_checkpoint(checkpoint_dir)`) restores weights, optimizer, schedule, RNG and data
    position, and training goes on to the same `cfg.steps`.
    """
    dist = dist_info()
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
    batches = TokenBatches(train_data, seq_len=cfg.seq_len, global_batch=global_batch, seed=cfg.seed)
    # Every evaluation reads the same val windows (the first eval_batches global batches), so
    # successive val losses compare, and so do runs that split the global batch differently.
    val_batches = (TokenBatches(val_data, seq_len=cfg.seq_len, global_batch=global_batch, seed=cfg.seed)
                   if val_data is not None else None)
    optimizer = build_optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    start, history, baselines = 0, [], {}
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        _check_resumable(ckpt.state, cfg, global_batch, precision, resume_from)
        start, history = ckpt.step, [StepRecord(**r) for r in ckpt.state["history"]]
        baselines = ckpt.state.get("baseline_val_losses", {})
        # With a different world size than the saved run, extra ranks take rank 0's RNG state.
        restore_rng_state(ckpt.rng_states[dist.rank if dist.rank < len(ckpt.rng_states) else 0])
    elif checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        raise ValueError(f"{checkpoint_dir} already holds checkpoints of a run: resume with "
                         f"resume_from=latest_checkpoint(checkpoint_dir), or use an empty directory")
    elif val_batches is not None:
        # Measured before the first update (a resumed run reads them from its checkpoint).
        baselines = {"untrained": evaluate(model, val_batches, cfg, dist, autocast),
                     "unigram": unigram_val_loss(train_data, val_batches, cfg, model.config.vocab_size)}
    if checkpoint_dir is not None and dist.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_dirs(checkpoint_dir)

    ddp_model = model
    if dist.world_size > 1 and cfg.parallelism == "fsdp":
        # Every rank built the same weights (or loaded the same checkpoint): each keeps its shard.
        # The sharded parameters are new tensors: the optimizer and its schedule move over to them.
        plain_state = optimizer.state_dict()
        shard_model(model)
        optimizer = build_optimizer(model, cfg)
        # The schedule first: constructing it sets the LR of step 0, which the loaded state overrides.
        scheduler = _scheduler(optimizer, cfg, state=scheduler.state_dict())
        if plain_state["state"]:
            load_full_optimizer_state(model, optimizer, plain_state)
    elif dist.world_size > 1:
        # DDP broadcasts rank 0's weights at construction and averages gradients in backward.
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    tokens_per_step = global_batch * cfg.seq_len
    checkpoints: list[Path] = []
    model.train()

    for step in range(start, cfg.steps):
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = batches.micro_batch(step, micro=micro, grad_accum=cfg.grad_accum, rank=dist.rank,
                                        world_size=dist.world_size).to(device)
            # DDP all-reduces (FSDP reduce-scatters) gradients in every backward unless told not
            # to: only the last micro-batch's backward needs to.
            last = micro == cfg.grad_accum - 1
            if is_sharded(model):
                model.set_requires_gradient_sync(last)
            with ddp_model.no_sync() if ddp_model is not model and not last else nullcontext():
                with autocast:
                    logits = ddp_model(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                # The step's loss is the mean over its micro-batches (all the same size).
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        # Returns the norm before clipping; an infinite max_norm measures without clipping.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards, replicated
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = mean_across_ranks(loss_sum / cfg.grad_accum).item()  # syncs with the device
        seconds = time.perf_counter() - started
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"step {step + 1}: train loss is {step_loss}; stopping")

        done = step + 1
        val_loss = None
        if val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            val_loss = evaluate(model, val_batches, cfg, dist, autocast)
        record = StepRecord(step=done, loss=step_loss, lr=lr, grad_norm=grad_norm.item(),
                            tokens_seen=done * tokens_per_step, seconds=seconds, val_loss=val_loss)
        history.append(record)
        if on_step is not None and dist.is_main:
            on_step(record)

        if checkpoint_dir is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                           or done == cfg.steps):
            # Collectives, every rank calls them; under FSDP the weights and the optimizer state
            # are gathered whole onto rank 0, so a checkpoint is the same whatever wrote it.
            rng_states = gather_objects(capture_rng_state())
            saved_model, saved_optimizer = _unsharded(model, optimizer, cfg)
            if dist.is_main:
                state = _resume_state(cfg, done, global_batch, precision, dist, history, baselines)
                path = save_checkpoint(checkpoint_dir, done, model=saved_model, optimizer=saved_optimizer,
                                       scheduler=scheduler, rng_states=rng_states, state=state)
                checkpoints.append(path)
                if on_checkpoint is not None:
                    on_checkpoint(path, done)
            # Every rank leaves this step with the checkpoint committed (if rank 0 fails to write it,
            # torchrun stops the others here rather than letting them train past it).
            barrier()

    this_run = history[start:]
    losses = [r.loss for r in history[-cfg.loss_window:]]
    val_losses = [r.val_loss for r in history if r.val_loss is not None]
    return TrainResult(
        final_train_loss=sum(losses) / len(losses),
        final_val_loss=val_losses[-1] if val_losses else None,
        history=history,
        tokens_seen=cfg.steps * tokens_per_step,
        tokens_per_second=len(this_run) * tokens_per_step / max(1e-9, sum(r.seconds for r in this_run)),
        steps_done=cfg.steps,
        resumed_from_step=start if resume_from is not None else None,
        precision=precision,
        checkpoints=checkpoints,
        baseline_val_losses=baselines,
    )


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               state: dict[str, Any] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.learning_rate)
    if state is not None:
        scheduler.load_state_dict(state)
    return scheduler


def _unsharded(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> tuple[PreTrainedModel | None, torch.optim.Optimizer | None]:
    """`model` and `optimizer` as an unsharded run holds them: themselves unless FSDP sharded
    them, else full copies on rank 0's CPU (None elsewhere). A collective under FSDP."""
    if not is_sharded(model):
        return model, optimizer
    plain, optimizer_state = full_model(model), full_optimizer_state(model, optimizer)
    if plain is None:
        return None, None
    plain_optimizer = build_optimizer(plain, cfg)
    plain_optimizer.load_state_dict(optimizer_state)
    return plain, plain_optimizer


@torch.no_grad()
def evaluate(model: PreTrainedModel, val_batches: TokenBatches, cfg: TrainConfig, dist: DistInfo,
             autocast: AbstractContextManager) -> float:
    """Mean loss over the first `cfg.eval_batches` global val batches: each rank reads its slice,
    in micro-batches of the training size (whose memory use is known to fit)."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        for micro in range(cfg.grad_accum):
            batch = val_batches.micro_batch(i, micro=micro, grad_accum=cfg.grad_accum, rank=dist.rank,
                                            world_size=dist.world_size).to(device)
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    model.train()
    return mean_across_ranks(total / (cfg.eval_batches * cfg.grad_accum)).item()


def unigram_log_probs(train_data: TokenData, vocab_size: int) -> np.ndarray:
    """Natural-log probability of every id below `vocab_size` under a unigram model of
    `train_data`, add-one smoothed: a token the training data never holds keeps a finite loss.
    The reference model of the pretraining gate (here) and of the eval report's bits per byte."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount widens its input to int64: count a memory-mapped shard piece by piece
    for array in train_data.arrays:
        for start in range(0, len(array), chunk):
            counts += np.bincount(array[start : start + chunk], minlength=vocab_size)
    return np.log((counts + 1) / (counts.sum() + vocab_size))


def unigram_val_loss(train_data: TokenData, val_batches: TokenBatches, cfg: TrainConfig, vocab_size: int) -> float:
    """Mean loss, in nats per token, of the unigram model of `train_data` (`unigram_log_probs`) on
    the targets `evaluate` reads: the bar a model that learned anything beyond token frequencies
    is below."""
    log_probs = torch.from_numpy(unigram_log_probs(train_data, vocab_size))
    targets = torch.cat([val_batches.rows(i, slice(None))[:, 1:].flatten() for i in range(cfg.eval_batches)])
    return -log_probs[targets].mean().item()


def _resume_state(cfg: TrainConfig, step: int, global_batch: int, precision: str, dist: DistInfo,
                  history: list[StepRecord], baselines: dict[str, float]) -> dict[str, Any]:
    """What state.json records: enough to check and continue the run (weights etc. are files)."""
    return {
        "step": step,
        # The batch of a step is a function of these alone (see data.py): the data position.
        "data": {"position": step, "seed": cfg.seed, "global_batch": global_batch, "seq_len": cfg.seq_len},
        "precision": precision,
        "world_size": dist.world_size,
        "config": cfg.model_dump(mode="json"),
        "history": [dataclasses.asdict(r) for r in history],
        "baseline_val_losses": baselines,
    }


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, global_batch: int, precision: str, path: Path) -> None:
    saved = TrainConfig.model_validate(state["config"])
    differences = [f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(cfg, name)!r}"
                   for name in _TRAJECTORY_FIELDS if getattr(saved, name) != getattr(cfg, name)]
    if state["data"]["global_batch"] != global_batch:
        differences.append(f"global batch (batch_size × grad_accum × world_size): checkpoint "
                           f"{state['data']['global_batch']}, now {global_batch}")
    if state["precision"] != precision:
        differences.append(f"precision: checkpoint {state['precision']}, now {precision}")
    if differences:
        raise ValueError(f"cannot resume from {path}: the run would not continue the same trajectory; "
                         + "; ".join(differences))
