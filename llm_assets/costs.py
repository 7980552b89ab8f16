"""Compute and dollar estimates from the manifest's budget: one formula for `plan` and the cost gate."""

from __future__ import annotations

from dataclasses import dataclass

from llm_assets.manifest import Budget, ModelSize, PretrainRecipe, TrainerRecipe


@dataclass(frozen=True)
class Estimate:
    params: int  # N: matmul parameters
    tokens: int  # D
    flops: float  # 6·N·D
    gpu_hours: float
    usd: float


def training_estimate(size: ModelSize, recipe: PretrainRecipe | TrainerRecipe, budget: Budget) -> Estimate:
    n, d = size.matmul_parameters(), recipe.tokens()
    flops = 6.0 * n * d
    gpu_hours = flops / (budget.peak_flops_per_gpu * budget.assumed_mfu) / 3600
    return Estimate(n, d, flops, gpu_hours, gpu_hours * budget.usd_per_gpu_hour)


def billed_usd(wall_seconds: float, gpus: int, budget: Budget) -> float:
    """What a step cost: the GPU-hours it held at the budget's rate. Steps without GPUs (data
    stages, a laptop's CPU) are not billed."""
    return round(wall_seconds / 3600 * budget.usd_per_gpu_hour * gpus, 6)
