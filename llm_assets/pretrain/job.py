"""One training job as every torchrun rank runs it: the spec the launcher writes, and the run.

The pretrain_checkpoint asset writes a `RunSpec` and starts `python -m llm_assets.pretrain --spec`
(under torchrun when it asks for more than one process) through Dagster Pipes. Rank 0 talks back:
progress lines into the run's log, and at the end the training figures as the materialization's
metadata. With `progress` set, rank 0 also opens the artifact store itself: it resumes from the
step's last committed checkpoint and commits every new one, so a killed pod or run loses at most
`checkpoint_every` steps. Started by hand (no Pipes), it prints the same events as JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from llm_assets.hf_models import save_hf
from llm_assets.manifest import ModelSize
from llm_assets.pretrain.checkpoint import latest_checkpoint
from llm_assets.pretrain.data import TokenData
from llm_assets.pretrain.distributed import DistInfo, broadcast_object, full_model, maybe_init_distributed
from llm_assets.pretrain.loop import StepRecord, TrainConfig, TrainResult, train
from llm_assets.pretrain.model import build_model, load_base_model, matmul_parameters
from llm_assets.progress import StepProgress
from llm_assets.tracing import REPORTED_PHASES, PhaseClock
from llm_assets.tracking import STEP_METRICS
from llm_assets.worker import Reporter, WorkerSpec, write_failure

HISTORY_POINTS = 200  # loss-curve points reported to the UI


class StoreProgress(WorkerSpec):
    """Where rank 0 commits checkpoints: the store, and the step they belong to."""

    store: dict[str, Any]  # ArtifactStoreResource.for_child_process()
    asset: str
    partition: str | None
    fingerprint: str

    def open(self) -> StepProgress:
        """The step's progress in the store. Only rank 0 calls it: the resource's module imports
        Dagster, a second of every rank's start otherwise."""
        from resources.artifact_store_resource import store_from_config

        return StepProgress(store_from_config(self.store), self.asset, self.partition, self.fingerprint)


class RunSpec(WorkerSpec):
    model: ModelSize | None = None  # the architecture of a fresh model
    base_model_dir: str | None = None  # continued pretraining: the HF model to start from instead
    train: dict[str, Any]  # TrainConfig fields
    train_bins: list[str]
    val_bins: list[str] = []
    token_dtype: Literal["uint16", "uint32"]
    checkpoint_dir: str  # local scratch where checkpoints are written before they are committed
    resume: Literal["latest"] | str | None = None  # "latest" in checkpoint_dir, a checkpoint path, or none
    progress: StoreProgress | None = None  # resume from / commit to the store (overrides `resume`)
    export_dir: str | None = None  # the HF model directory rank 0 writes at the end
    tokenizer_dir: str | None = None  # copied into export_dir
    result: str | None = None  # a JSON TrainResult rank 0 writes at the end
    error_file: str | None = None  # rank 0 writes the failure here, for the launcher's message

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    def starting_model(self, seed: int) -> torch.nn.Module:
        """A fresh model of `model`, or the base model of continued pretraining."""
        if self.base_model_dir is not None:
            return load_base_model(Path(self.base_model_dir))
        if self.model is None:
            raise ValueError("a run spec names the model to train: `model` (an architecture) or `base_model_dir`")
        return build_model(self.model, seed=seed)


def measured_peak_flops(precision: str, device: torch.device) -> float:
    """FLOP/s of a large matmul in the training precision on this device: the MFU denominator."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.matmul(a, b)
    reps = 8
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - started)


def summary(result: TrainResult, params: int, device: torch.device, world_size: int) -> dict[str, Any]:
    """The figures rank 0 reports: losses, throughput, MFU (6·`params` FLOPs per token) against the
    measured peak of all ranks."""
    achieved = 6 * params * result.tokens_per_second
    peak = measured_peak_flops(result.precision, device) * world_size
    history = result.history
    initial = history[0].loss if history else float("nan")
    return {
        "steps": result.steps_done,
        "resumed_from_step": result.resumed_from_step if result.resumed_from_step is not None else -1,
        "initial_loss": round(initial, 4),
        "final_train_loss": round(result.final_train_loss, 4),
        "final_val_loss": round(result.final_val_loss, 4) if result.final_val_loss is not None else float("nan"),
        # The same val windows scored by reference models: what the val loss gate is measured from.
        **{f"{kind}_val_loss": round(loss, 4) for kind, loss in result.baseline_val_losses.items()},
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "achieved_flops_per_second": round(achieved, 1),
        "mfu": round(achieved / peak, 4),
        "measured_peak_flops_per_second": round(peak, 1),
        "precision": result.precision,
        "world_size": world_size,
        "loss_history": [[r.step, round(r.loss, 4)] for r in history[:: max(1, len(history) // HISTORY_POINTS)]],
        # The tracker's curves, thinned as the loss history is.
        STEP_METRICS: [{"step": r.step, "loss": r.loss, "learning_rate": r.lr, "grad_norm": r.grad_norm,
                        "tokens_per_second": r.tokens_seen / max(1, r.step) / max(1e-9, r.seconds)}
                       for r in history[:: max(1, len(history) // HISTORY_POINTS)]],
        # (step, tokens seen, val loss) at every evaluation: the scaling fit's points over D.
        "val_history": [[r.step, r.tokens_seen, round(r.val_loss, 4)] for r in history if r.val_loss is not None],
    }


def _resume_point(spec: RunSpec, progress: StepProgress | None, reporter: Reporter) -> str | None:
    """The checkpoint to resume from (decided by rank 0, which alone reads the store)."""
    if progress is not None:
        found = progress.resume_point()
        if found is None:
            return None
        reporter.event("resume", f"resuming from the committed checkpoint of step {found[1]}", step=found[1])
        return str(found[0])
    if spec.resume == "latest":
        latest = latest_checkpoint(Path(spec.checkpoint_dir))
        return str(latest) if latest else None
    return spec.resume


def run(spec: RunSpec) -> TrainResult:
    """Train as `spec` says; every rank calls this (see the module docstring for who does what)."""
    dist = maybe_init_distributed()
    reporter = Reporter.open(dist.is_main)
    try:
        return _run(spec, dist, reporter)
    except BaseException as exc:
        if dist.is_main:
            write_failure(spec.error_file, exc)
        raise
    finally:
        reporter.close()


def _run(spec: RunSpec, dist: DistInfo, reporter: Reporter) -> TrainResult:
    cfg = spec.train_config()
    # The step's trace shows these phases: this process has no span to open them under, so rank 0
    # reports their times with its figures (tracing.PhaseClock).
    clock = PhaseClock()
    with clock.phase("load"):
        model = spec.starting_model(cfg.seed).to(dist.device)
        params = matmul_parameters(model)  # before FSDP shards it
        train_data = TokenData.from_bin_files(spec.train_bins, spec.token_dtype)
        val_data = TokenData.from_bin_files(spec.val_bins, spec.token_dtype) if spec.val_bins else None
        progress = spec.progress.open() if spec.progress is not None and dist.is_main else None
        resume = broadcast_object(_resume_point(spec, progress, reporter) if dist.is_main else None)
    every = max(1, cfg.steps // 20)

    def on_step(record: StepRecord) -> None:
        if record.step % every == 0 or record.val_loss is not None:
            val = f", val {record.val_loss:.4f}" if record.val_loss is not None else ""
            reporter.event("step", f"step {record.step}/{cfg.steps}: loss {record.loss:.4f}{val}",
                           step=record.step, loss=record.loss, val_loss=record.val_loss)

    def on_checkpoint(path: Path, step: int) -> None:
        if progress is None:
            reporter.event("checkpoint", f"checkpoint of step {step} written to {path}", step=step, path=str(path))
            return
        ref = progress.commit(path, step)
        reporter.event("checkpoint", f"checkpoint of step {step} committed as {ref.sha256[:12]}",
                       step=step, artifact=ref.sha256)

    with clock.phase("train"):
        result = train(model, train_data, val_data, cfg, checkpoint_dir=Path(spec.checkpoint_dir),
                       resume_from=Path(resume) if resume else None, on_step=on_step, on_checkpoint=on_checkpoint)
    # A collective under FSDP (every rank calls it): the full weights, gathered onto rank 0.
    exported = full_model(model) if spec.export_dir else None
    if dist.is_main:
        if spec.export_dir:
            save_hf(exported, Path(spec.export_dir), Path(spec.tokenizer_dir) if spec.tokenizer_dir else None)
        if spec.result:
            Path(spec.result).write_text(json.dumps(dataclasses.asdict(result), default=str, indent=1))
        reporter.report({**summary(result, params, dist.device, dist.world_size), REPORTED_PHASES: clock.phases})
    return result
