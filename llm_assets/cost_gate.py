"""The cost gate and the cost record of every step: run once, for every stage, by
``materialize_artifact`` on a cache miss (a cache hit spends nothing and is never refused).

Before anything is read or built, a step with an estimate (training, evaluation, quantization:
``llm_assets.costs``) is refused when that estimate plus what is already spent exceeds
``budget.usd_cap``; what is spent is the recorded ``cost_usd`` of the current materialization of
every other asset partition in the instance. After the build, the step's actual cost is measured
and stored with the artifact. See docs/costs.md.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import dagster as dg

from llm_assets.costs import ESTIMATED_ASSETS, USD_DIGITS, Device, Estimate, actual_usd, step_estimate
from llm_assets.manifest import Budget, PipelineManifest

META_COST_USD = "cost_usd"
META_ESTIMATED_COST_USD = "estimated_cost_usd"
META_COST_ESTIMATE = "cost_estimate"
# How the refusal names what a stage does, and the recipe fields that size its estimate.
_DOING = {"pretrain": "training", "sft": "training", "reward": "training", "policy": "training",
          "monitoring.fine_tune": "fine-tuning", "evaluation": "evaluating", "quantize": "quantizing"}
_SIZED_BY = {"evaluation": "max_docs, limit or tasks", "quantize": "calibration_texts, heldout_texts or max_tokens",
             "monitoring.fine_tune": "sft,dpo}.{steps, batch_size or grad_accum"}


@dataclass(frozen=True)
class Spent:
    usd: float
    partitions: int  # asset partitions whose current materialization recorded a cost


def spent_usd(instance: dg.DagsterInstance, building: dg.AssetKey, partition: str | None) -> Spent:
    """What the current materialization of every asset partition but ``building[partition]`` cost.

    One query over the instance's materializations (newest first; the first one seen of each asset
    partition is its current one), not one per asset: it reads the whole materialization history,
    which is what keeps it one query."""
    records = instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION))
    seen: set[tuple[dg.AssetKey, str | None]] = {(building, partition)}
    usd, counted = 0.0, 0
    for record in records:
        mat = record.asset_materialization
        if mat is None or (mat.asset_key, mat.partition) in seen:
            continue
        seen.add((mat.asset_key, mat.partition))
        cost = mat.metadata.get(META_COST_USD)
        if cost is not None:
            usd, counted = usd + float(cost.value), counted + 1
    return Spent(usd, counted)


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 else f"${value:.3g}"


def over_budget(step: str, stage: str, estimate: Estimate, spent: Spent, budget: Budget,
                manifest_path: str) -> str | None:
    """Why ``step`` may not start, naming every figure; None when it fits in what is left of the cap."""
    if spent.usd + estimate.usd <= budget.usd_cap:
        return None
    recipe = f"stages.{stage}.{{{_SIZED_BY.get(stage, 'steps, batch_size or grad_accum')}}}"
    return (
        f"refused: {_DOING[stage]} {step} is estimated at {_usd(estimate.usd)} ({estimate.describe(budget)}) and "
        f"{_usd(spent.usd)} is already spent by the current materializations of {spent.partitions} other asset "
        f"partition(s): {_usd(spent.usd + estimate.usd)} in all, over budget.usd_cap {_usd(budget.usd_cap)} by "
        f"{_usd(spent.usd + estimate.usd - budget.usd_cap)}. Nothing was built. Shrink {recipe} or the model sizes, "
        f"or raise budget.usd_cap, in {manifest_path}; `llm-assets plan` prints every step's estimate."
    )


def step_manifest(context: dg.AssetExecutionContext) -> PipelineManifest:
    """The manifest of the step's `pipeline` resource: its budget prices every step."""
    if not hasattr(context.resources, "pipeline"):
        raise dg.DagsterInvariantViolationError(
            f"{context.asset_key.to_user_string()} stores an artifact but does not take the `pipeline` resource: "
            "add `pipeline: PipelineResource` to the asset's parameters (materialize_artifact prices every step "
            "with the manifest's budget and refuses one over it)")
    return context.resources.pipeline.load()


def step_gpus(context: dg.AssetExecutionContext) -> int:
    """The GPUs this step holds: every one CUDA shows, for a step whose pod asks for GPUs (tag
    `compute: gpu`); none for the others, or where CUDA shows none (a laptop)."""
    if context.assets_def.tags_by_key.get(context.asset_key, {}).get("compute") != "gpu":
        return 0
    import torch  # only steps that ask for GPUs pay for importing it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_budget(context: dg.AssetExecutionContext, manifest: PipelineManifest, device: Device) -> Estimate | None:
    """Refuse (``dg.Failure``) a step whose estimate exceeds what is left of the cap; its estimate
    when it has one."""
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    estimate = step_estimate(manifest, asset, partition, device)
    if estimate is None:
        return None
    spent = spent_usd(context.instance, context.asset_key, partition)
    step = asset if partition is None else f"{asset}[{partition}]"
    refusal = over_budget(step, ESTIMATED_ASSETS[asset], estimate, spent, manifest.budget,
                          context.resources.pipeline.manifest_path)
    if refusal is not None:
        raise dg.Failure(description=refusal, allow_retries=False, metadata={
            META_ESTIMATED_COST_USD: round(estimate.usd, USD_DIGITS), "spent_usd": round(spent.usd, USD_DIGITS),
            "usd_cap": manifest.budget.usd_cap})
    context.log.info(f"{step}: estimated at {_usd(estimate.usd)} ({estimate.describe(manifest.budget)}); "
                     f"{_usd(spent.usd)} spent of budget.usd_cap {_usd(manifest.budget.usd_cap)}")
    return estimate


def cpu_seconds() -> float:
    """CPU time of this process and of the workers it has waited for (training, quantization)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def cost_metadata(budget: Budget, estimate: Estimate | None, wall_seconds: float, gpus: int,
                  cpu_used: float) -> dict[str, float | str]:
    """What the step cost, and what it was estimated to cost where it has an estimate."""
    meta: dict[str, float | str] = {META_COST_USD: actual_usd(wall_seconds, gpus, cpu_used, budget)}
    if estimate is not None:
        meta[META_ESTIMATED_COST_USD] = round(estimate.usd, USD_DIGITS)
        meta[META_COST_ESTIMATE] = estimate.describe(budget)
    return meta
