"""A trl stage as every torchrun rank runs it: the spec the asset writes, and the run.

When compute.training asks for more than one process, the sft_model, reward_model and policy
assets write a `TrlRunSpec` and start `python -m llm_assets.posttrain --spec` under torchrun through
Dagster Pipes. transformers' Trainer joins torchrun's process group (gloo on CPU, NCCL on GPUs) and
trains with DDP, each rank on its share of the batch. Rank 0 talks back: trl's log lines and the
checkpoints it commits into the run's log, and at the end the stage's figures as the
materialization's metadata. Rank 0 also commits every checkpoint to the artifact store itself,
under the step's fingerprint, so a rerun of the step resumes from it (the asset finds it and names
it in `resume_from`). The first rank to fail leaves its error for the asset's one-line failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_assets.posttrain.common import log_line
from llm_assets.posttrain.stage import StageWork, run_stage
from llm_assets.pretrain.distributed import maybe_init_distributed
from llm_assets.pretrain.job import StoreProgress
from llm_assets.worker import Reporter, WorkerSpec, write_failure


class TrlRunSpec(WorkerSpec):
    work: StageWork
    label: str  # the step, as the run's log names it: "sft_model[xs]"
    out_dir: str  # the HF model directory rank 0 exports
    work_dir: str  # local scratch for trl's checkpoint-N directories (and SFT's LoRA adapters)
    resume_from: str | None = None  # a committed checkpoint-N directory, found by the asset
    progress: StoreProgress | None = None  # where rank 0 commits checkpoints; none: they stay in work_dir
    error_file: str | None = None  # the first rank to fail writes its failure here


def run(spec: TrlRunSpec) -> dict[str, Any]:
    """Train as `spec` says; every rank calls this. Returns the stage's figures."""
    dist = maybe_init_distributed()
    reporter = Reporter.open(dist.is_main)
    try:
        progress = spec.progress.open() if spec.progress is not None and dist.is_main else None

        def on_checkpoint(path: Path, step: int) -> None:  # rank 0 only (common.CheckpointCallback)
            if progress is None:
                reporter.event("checkpoint", f"{spec.label}: checkpoint of step {step} written to {path}",
                               step=step, path=str(path))
                return
            ref = progress.commit(path, step)
            reporter.event("checkpoint", f"{spec.label}: checkpoint of step {step} committed as {ref.sha256[:12]}",
                           step=step, artifact=ref.sha256)

        def on_log(entry: dict[str, Any]) -> None:  # rank 0 only (common.LogCallback)
            reporter.event("log", f"{spec.label}: {log_line(entry)}", **entry)

        resume = Path(spec.resume_from) if spec.resume_from is not None else None
        figures = run_stage(spec.work, Path(spec.out_dir), Path(spec.work_dir), resume, on_checkpoint, on_log)
        if dist.is_main:
            reporter.report(figures)
        return figures
    except BaseException as exc:
        write_failure(spec.error_file, exc, rank=dist.rank if dist.world_size > 1 else None)
        raise
    finally:
        reporter.close()
