"""What a step is estimated to cost and what it cost: one set of formulas for `plan`, the cost gate
every training, evaluation and quantization step passes before it builds, and the `cost_usd`
every step records.

Estimates count matmul FLOPs: 6·N·D for training (forward and backward over D tokens), 2·N·D for
the forward passes of evaluation and quantization. A step with GPUs is priced in GPU-hours (the
budget's assumed MFU of the accelerator's peak, at `usd_per_gpu_hour`), a step without in
CPU-hours (`cpu_flops_per_core`, the training throughput one core achieves, at
`usd_per_cpu_hour`). Data, tokenizer, release and serving steps have no estimate: they are priced
after the fact, by the CPU time they used, and never refused. See docs/costs.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm_assets.manifest import (
    QUANT_SCHEMES,
    BaseModelSize,
    Budget,
    FineTuneRecipe,
    ModelSize,
    PipelineManifest,
    PretrainRecipe,
    TrainerRecipe,
)

Device = Literal["gpu", "cpu"]

# The asset of each stage with an estimate, and the recipe of the manifest that sizes it (a path
# under `stages`).
GRAPH_ASSETS = {
    "pretrain_checkpoint": "pretrain",
    "sft_model": "sft",
    "reward_model": "reward",
    "policy": "policy",
    "eval_report": "evaluation",
    "quantized_model": "quantize",
}
# The loop's steps run when served traffic triggers them, not when the graph is materialized: the
# cost gate prices each before it starts, and `plan` (the graph's cost) leaves them out.
LOOP_ASSETS = {"feedback_model": "monitoring.fine_tune", "feedback_eval_report": "evaluation"}
ESTIMATED_ASSETS = {**GRAPH_ASSETS, **LOOP_ASSETS}
TRAINING_STAGES = ("pretrain", "sft", "reward", "policy", "monitoring.fine_tune")
# Costs are recorded to the nano-dollar: a data step of a second on a CPU costs about 1e-5 dollars.
USD_DIGITS = 9
# eval_report runs the shipped held-out tasks (perplexity, multiple choice, generation) and the
# manifest's; a document is scored as at most 4 sequences (the 4 answers of a multiple-choice
# question) of at most the model's context: an upper bound on the tokens evaluated.
SHIPPED_EVAL_TASKS = 3
SEQUENCES_PER_EVAL_DOC = 4


@dataclass(frozen=True)
class Estimate:
    params: int  # N: matmul parameters
    tokens: int  # D: tokens trained on, or passed forward
    flops_per_param_token: int  # 6 for training, 2 for a forward pass
    flops: float
    device: Device
    device_hours: float  # GPU-hours on a GPU, CPU-core-hours on a CPU
    usd: float

    def describe(self, budget: Budget) -> str:
        """How the figure was computed, with the budget's numbers, for messages and the UI."""
        rate = (f"at {budget.assumed_mfu:.0%} MFU of {budget.peak_flops_per_gpu:.3g} FLOP/s per GPU, "
                f"${budget.usd_per_gpu_hour:g}/GPU-hour" if self.device == "gpu" else
                f"at {budget.cpu_flops_per_core:.3g} FLOP/s per CPU core, ${budget.usd_per_cpu_hour:g}/CPU-hour")
        return (f"{self.flops_per_param_token}·N·D = {self.flops_per_param_token} × {self.params:,} parameters × "
                f"{self.tokens:,} tokens = {self.flops:.3g} FLOPs; {self.device_hours:.4g} "
                f"{self.device.upper()}-hours {rate}")


def priced(params: int, tokens: int, flops_per_param_token: int, device: Device, budget: Budget) -> Estimate:
    flops = float(flops_per_param_token) * params * tokens
    if device == "gpu":
        hours = flops / (budget.peak_flops_per_gpu * budget.assumed_mfu) / 3600
        usd = hours * budget.usd_per_gpu_hour
    else:
        hours = flops / budget.cpu_flops_per_core / 3600
        usd = hours * budget.usd_per_cpu_hour
    return Estimate(params, tokens, flops_per_param_token, flops, device, hours, usd)


@dataclass(frozen=True)
class SizeFigures:
    """What an estimate needs of a model size."""

    params: int  # N: the parameters a matmul touches per token (transformer blocks and LM head)
    max_seq_len: int


class NotEstimable(ValueError):
    """A base model whose architecture cannot be read before it is imported."""


def size_figures(size: ModelSize | BaseModelSize) -> SizeFigures:
    if isinstance(size, ModelSize):
        return SizeFigures(size.matmul_parameters(), size.max_seq_len)
    return base_model_figures(size.base_model)


@functools.cache
def base_model_figures(base_model: str) -> SizeFigures:
    """N and the context of a base model, from its local config.json: the model is built on the
    meta device (no memory, no weights read) and the weights of its matmul layers counted, the
    same N as `ModelSize.matmul_parameters` for the project's own architecture."""
    config_file = Path(base_model) / "config.json"
    if not config_file.is_file():
        raise NotEstimable(f"base_model {base_model}: its parameters are read from a local config.json; an s3:// "
                           "prefix or a hub id is estimated once `base_model` has imported it")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(config_file.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Conv1D: GPT-2-style models write their matmuls as it; a tied LM head is counted, as it is a matmul.
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    return SizeFigures(params, config.max_position_embeddings)


def training_estimate(size: SizeFigures, recipe: PretrainRecipe | TrainerRecipe | FineTuneRecipe, budget: Budget,
                      device: Device) -> Estimate:
    """6·N·D over the recipe's tokens (for the trl stages: every sequence at max_length, at most)."""
    return priced(size.params, recipe.tokens(), 6, device, budget)


def _forward_tokens(manifest: PipelineManifest, stage: str, size: SizeFigures, scheme: str | None) -> int:
    """D of an evaluation or quantization step for one model size."""
    stages = manifest.stages
    if stage == "evaluation":
        recipe = stages.evaluation
        shipped_docs = min(recipe.max_docs, recipe.limit or recipe.max_docs)
        # A user task without `limit` is counted at max_docs documents: set limit to bound it.
        user_docs = len(recipe.tasks) * (recipe.limit or recipe.max_docs)
        return (SHIPPED_EVAL_TASKS * shipped_docs + user_docs) * SEQUENCES_PER_EVAL_DOC * size.max_seq_len
    if stage == "quantize":
        recipe = stages.quantize
        calibration = recipe.calibration_texts if scheme == "gptq-4bit" else 0
        # Both models, quantized and full precision, are measured on the held-out texts.
        return (calibration + 2 * recipe.heldout_texts) * min(recipe.max_tokens, size.max_seq_len)
    raise ValueError(f"stage {stage!r} has no estimate; stages with one: {', '.join(ESTIMATED_ASSETS.values())}")


def stage_recipe(manifest: PipelineManifest, stage: str) -> Any:
    """The recipe at ``stage``, a path under the manifest's stages (``monitoring.fine_tune``); None
    where the manifest does not configure it."""
    recipe: Any = manifest.stages
    for name in stage.split("."):
        recipe = getattr(recipe, name) if recipe is not None else None
    return recipe


def stage_estimate(manifest: PipelineManifest, stage: str, size_name: str, device: Device,
                   scheme: str | None = None) -> Estimate:
    """The estimate of one step of ``stage`` (a path under the manifest's stages) for a model size."""
    size = size_figures(manifest.model_sizes[size_name])
    if stage in TRAINING_STAGES:
        return training_estimate(size, stage_recipe(manifest, stage), manifest.budget, device)
    return priced(size.params, _forward_tokens(manifest, stage, size, scheme), 2, device,
                  manifest.budget)


def step_estimate(manifest: PipelineManifest, asset: str, partition: str | None, device: Device) -> Estimate | None:
    """The estimate of materializing ``asset`` (one partition): None for a stage without one. A
    multi-dimensional partition (``quantized_model``'s ``tiny|gptq-4bit``) is read by its parts."""
    stage = ESTIMATED_ASSETS.get(asset)
    if stage is None or stage_recipe(manifest, stage) is None:
        return None
    parts = (partition or "").split("|")
    sizes = [p for p in parts if p in manifest.model_sizes]
    if len(sizes) != 1:
        raise ValueError(f"{asset}[{partition}]: the partition names no model size of the manifest "
                         f"({', '.join(sorted(manifest.model_sizes))}); reload the code location")
    scheme = next((p for p in parts if p in QUANT_SCHEMES), None)
    return stage_estimate(manifest, stage, sizes[0], device, scheme)


def plan_estimates(manifest: PipelineManifest, device: Device) -> list[tuple[str, str, Estimate]]:
    """(stage, partition, estimate) of every estimated step the manifest configures; a base-model
    size is pretrained only with continued_pretraining, and one that cannot be estimated before
    its import is left out."""
    rows = []
    estimable = [name for name in manifest.model_sizes if _estimable(manifest.model_sizes[name])]
    for stage in GRAPH_ASSETS.values():
        if stage_recipe(manifest, stage) is None:
            continue
        schemes = manifest.stages.quantize.schemes if stage == "quantize" else [None]
        for size in [s for s in estimable if s in manifest.checkpoint_sizes] if stage == "pretrain" else estimable:
            for scheme in schemes:
                partition = size if scheme is None else f"{size}|{scheme}"  # as Dagster joins the dimensions
                rows.append((stage, partition, stage_estimate(manifest, stage, size, device, scheme)))
    return rows


def _estimable(size: ModelSize | BaseModelSize) -> bool:
    try:
        size_figures(size)
    except NotEstimable:
        return False
    return True


def billed_usd(wall_seconds: float, gpus: int, budget: Budget) -> float:
    """What a step with GPUs cost: the GPU-hours it held at the budget's rate (the pod's CPUs are
    part of a GPU-hour's price)."""
    return round(wall_seconds / 3600 * budget.usd_per_gpu_hour * gpus, USD_DIGITS)


def actual_usd(wall_seconds: float, gpus: int, cpu_seconds: float, budget: Budget) -> float:
    """What a step cost: its GPU-hours when it held GPUs, else the CPU time it used (its own
    process and the workers it waited for) at ``usd_per_cpu_hour``."""
    if gpus:
        return billed_usd(wall_seconds, gpus, budget)
    return round(cpu_seconds / 3600 * budget.usd_per_cpu_hour, USD_DIGITS)
