"""The gate check, written once: a blocking check of one model-stage asset, per partition, that
reads figures off the materialization under check and judges them against the manifest's gates.

Each stage states only what is its own (which gates, how to read its figures, what else makes
the artifact unusable, which baselines it measured); the rest — the partition under check, the
thresholds, relative gates against the current release or those baselines, a reviewer's
override, the metadata the release and the run lock read back — is here.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from llm_assets.checks.gates import GATE_METADATA_KEY, GateJudgement, judge_gates
from llm_assets.checks.scope import nothing_to_check, partition_under_check
from llm_assets.tracing import Attributes, step_trace
from resources.artifact_store_resource import ArtifactStoreResource
from resources.pipeline import PipelineResource


@dataclass(frozen=True)
class Figures:
    """What a gate check read off one materialization."""

    values: dict[str, float]  # gate name -> the figure it judges (NaN when there is none)
    # Further problems of a gate, judged (and overridable) with it.
    problems: dict[str, list[str]] = field(default_factory=dict)
    # The baselines the stage measured on the same held-out data, gate name -> kind -> figure
    # (kinds: untrained, unigram, base): a gate whose manifest entry names one is judged against it.
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # Problems that make the artifact unusable whatever a reviewer says: no override covers them.
    broken: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # shown with the verdict, besides the gates'
    summary: str = ""  # the description when everything holds


def gate_check(
    asset: dg.AssetsDefinition,
    *,
    name: str,
    gates: Sequence[str],
    read: Callable[[dg.AssetMaterialization], Figures],
    description: str,
) -> dg.AssetChecksDefinition:
    """A blocking, partitioned check named `name` on `asset` judging the manifest's `gates` with
    the figures `read` takes from the materialization under check."""

    @dg.asset_check(asset=asset, name=name, blocking=True, partitions_def=asset.partitions_def,
                    description=description, metadata={GATE_METADATA_KEY: ",".join(gates)})
    def check(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource,
              artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
        mat = partition_under_check(context, asset.key)
        if mat is None:
            return nothing_to_check(asset.key)
        label = asset.key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
        # The verdict is a span of the run's trace too (llm_assets/tracing.py; a no-op without an endpoint).
        with step_trace(context.run.run_id, context.get_step_execution_context().step.key) as traced, \
                traced.span(f"check {label} {name}") as span:
            figures = read(mat)
            gates = pipeline.load().gates
            judged = judge_gates(artifact_store.get_store(), gates, figures.values, mat.partition,
                                 mat.metadata["sha256"].value, figures.problems, figures.baselines)
            problems = figures.broken + ([judged.description] if judged.description and not judged.passed else [])
            warn = not figures.broken and judged.warns_only(gates)
            result = dg.AssetCheckResult(
                passed=not problems,
                # A WARN failure neither holds the next step (Dagster blocks on ERROR) nor the release.
                severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
                description="; ".join(problems) or judged.description or figures.summary,
                metadata={**figures.metadata, **judged.metadata},
            )
            span.set_attributes(verdict_attributes(asset.key.to_user_string(), mat, name, figures, judged, result))
        return result

    return check


def verdict_attributes(asset: str, mat: dg.AssetMaterialization, check: str, figures: Figures,
                       judged: GateJudgement, result: dg.AssetCheckResult) -> Attributes:
    """What a gate check's span carries: the artifact under check, the verdict, and each gate's
    figure and whether it held (`gate.<name>.value`, `gate.<name>.passed`)."""
    per_gate: dict[str, str | bool | int | float] = {}
    for gate, value in figures.values.items():
        if math.isfinite(value):
            per_gate[f"gate.{gate}.value"] = value
        per_gate[f"gate.{gate}.passed"] = gate not in judged.failed
    return {"asset": asset, "partition": mat.partition or "", "sha256": mat.metadata["sha256"].value,
            "gate.check": check, "gate.passed": result.passed, "gate.severity": result.severity.value,
            "gate.failed": ",".join(judged.failed), **per_gate}
