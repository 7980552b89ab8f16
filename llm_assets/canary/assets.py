"""canary_report: the candidate release against the current one on live traffic, and the decision.

With `stages.serving.canary`, the release step proposes a new release as the size's candidate
instead of promoting it (llm_assets/release_pointer.py); `llm-assets serve --candidate` answers
a fraction of the requests with it. `canary_report` reads the server's logs, compares the two
releases (figures.py) and judges the manifest's `canary.*` gates, the same judgement its blocking
check `canary_gates` makes (and alerts on): every gate holds, the candidate is promoted; a gate
fails on a figure the traffic measured, it is rolled back (the current release stays); the traffic
does not tell yet (too few candidate requests, a figure with no data), it stays the candidate.
Without a candidate there is nothing to judge and nothing is materialized.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import dagster as dg

from llm_assets.artifacts import artifact_asset, canonical_json, materialize_artifact
from llm_assets.canary.figures import CanaryTraffic, canary_traffic
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.checks.gates import GateJudgement, judge_gates
from llm_assets.manifest import CANARY_GATES, GateSpec, PipelineManifest
from llm_assets.release_pointer import (
    READS_RELEASE_POINTER,
    candidate_release,
    current_release,
    move_release,
    reject_candidate,
)
from llm_assets.tables import table
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations
from resources.pipeline import PipelineResource

REPORT_JSON = "canary.json"
WAITING_GATE = "canary.candidate_requests"  # too few requests: wait for traffic, do not roll back
MISSING_KEY = "canary_missing"
SERVING_TRAFFIC = dg.AssetKey("serving_traffic")  # metadata: gate -> why its figure is NaN
Decision = Literal["promote", "reject", "wait"]
COLUMNS = [("role", "string"), ("release", "string"), ("requests", "int"), ("errors", "int"),
           ("error_rate", "float"), ("latency_p50_s", "float"), ("latency_p99_s", "float"),
           ("answers", "int", "answer texts in the log (--log-prompts)"), ("refusal_rate", "float"),
           ("ratings", "int"), ("feedback_score", "float", "mean rating, +1/-1")]


def canary_figures(values: dict[str, float], missing: dict[str, list[str]], gate_names: list[str]) -> Figures:
    """The figures of the manifest's canary gates; a NaN one carries why the traffic does not tell."""
    judged = {name: values.get(name, math.nan) for name in gate_names}
    return Figures(values=judged, problems={name: missing[name] for name in gate_names
                                            if name in missing and not math.isfinite(judged[name])},
                   summary="the candidate holds every canary gate")


def decide(gates: dict[str, GateSpec], figures: Figures, judged: GateJudgement) -> Decision:
    """Promote when every gate holds; roll back when a blocking gate fails on a measured figure;
    otherwise (too few candidate requests, a figure without data) wait for more traffic."""
    if judged.passed:
        return "promote"
    blocking = [name for name in judged.failed if name not in gates or gates[name].blocking]
    measured = [name for name in blocking if name != WAITING_GATE and math.isfinite(figures.values[name])]
    if measured:
        return "reject"
    return "wait" if blocking else "promote"  # only non-blocking gates failed: they inform


def traffic_landed() -> dg.AutomationCondition:
    """Judge the canary when a window of traffic lands (monitoring's `serving_traffic`, named by
    key: that layer lies above this one), once nothing it reads is still being written."""
    landed = dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(SERVING_TRAFFIC))
    return (landed.since_last_handled().with_label("a window of traffic landed")
            & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    serving = manifest.stages.serving
    if serving is None or serving.canary is None or manifest.stages.evaluation is None or not manifest.model_sizes:
        return dg.Definitions()
    recipe = serving.canary
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))
    gate_names = [name for name in CANARY_GATES if name in manifest.gates]
    # With the loop's monitoring, each window of traffic that lands is new evidence: the canary is
    # judged under automation. Without it, canary_report is materialized by hand or by the CLI.
    monitored = manifest.stages.monitoring is not None

    @artifact_asset(
        partitions_def=model_sizes, code_version="1", kinds={"json"}, group_name="release", tags=READS_RELEASE_POINTER,
        ins={"release": dg.AssetIn()}, output_required=False,
        deps=[dg.AssetDep(SERVING_TRAFFIC, partition_mapping=dg.AllPartitionMapping())] if monitored else None,
        automation_condition=traffic_landed() if monitored else None,
        description="The candidate release against the current one on the server's logs (error rate, latency, "
                    "refusals, feedback); promotes the candidate or rolls it back on the canary gates.",
    )
    def canary_report(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                      artifact_store: ArtifactStoreResource, release: ArtifactHandle):
        store, partition = artifact_store.get_store(), context.partition_key
        candidate, current = candidate_release(store, partition), current_release(store, partition)
        if candidate is None or current is None:
            context.log.info(f"canary_report[{partition}]: no candidate release to judge (current "
                             f"{(current or 'none')[:12]}); the release step proposes one when it stores a new one")
            return
        try:
            traffic = canary_traffic(Path(recipe.log_dir), current, candidate)
        except (OSError, ValueError) as exc:
            raise dg.Failure(f"canary_report[{partition}]: cannot read the server's logs: {exc}") from None
        document = {"partition": partition, "current": current, "candidate": candidate, "fraction": recipe.fraction,
                    "traffic": {"current": traffic.current.row(), "candidate": traffic.candidate.row()},
                    "figures": traffic.gate_figures()}

        def build(out: Path) -> dict:
            (out / REPORT_JSON).write_text(canonical_json(document) + "\n")
            return _report_metadata(traffic)

        # The windows of traffic that triggered the judgement are its lineage (recorded, not read:
        # the report reads the live logs, open files included).
        windows = {key: ArtifactHandle.from_materialization(mat) for key, mat in
                   latest_materializations(context.instance, SERVING_TRAFFIC).items()} if monitored else {}
        result = materialize_artifact(context, store, kind="canary_report", build=build,
                                      config={"current": current, "candidate": candidate, "traffic": traffic.digest},
                                      inputs={"release": release},
                                      narrowed_inputs={"serving_traffic": windows} if windows else None,
                                      input_files={"release": (), "serving_traffic": ()})
        gates = pipeline.load().gates
        figures = canary_figures(traffic.gate_figures(), traffic.missing(), gate_names)
        judged = judge_gates(store, gates, figures.values, partition, result.value.sha256, figures.problems)
        decision = decide(gates, figures, judged)
        by = f"canary_report run {context.run_id}"
        if decision == "promote":
            move_release(store, partition, candidate, "promote", by=by)
        elif decision == "reject":
            reject_candidate(store, partition, candidate, by=by)
        said = {"promote": f"promoted {candidate[:12]} (was {current[:12]})",
                "reject": f"rolled back: {candidate[:12]} is no longer the candidate, {current[:12]} stays current",
                "wait": f"{candidate[:12]} stays the candidate until the traffic tells"}[decision]
        context.log.info(f"canary_report[{partition}]: {said}" + (f": {judged.description}" if judged.description
                                                                   else ""))
        yield dg.Output(result.value, data_version=result.data_version, metadata={
            **result.metadata, "decision": decision, "decision_reason": judged.description or figures.summary})

    def read(mat: dg.AssetMaterialization) -> Figures:
        missing = mat.metadata.get(MISSING_KEY)
        values = {name: float(mat.metadata[name].value) for name in gate_names if name in mat.metadata}
        return canary_figures(values, missing.value if missing is not None else {}, gate_names)

    canary_gates = gate_check(canary_report, name="canary_gates", gates=gate_names, read=read,
                              description="The candidate's live figures against the current release's hold every "
                                          "canary.* gate of the manifest (the decision canary_report acted on).")
    return dg.Definitions(assets=[canary_report], asset_checks=[canary_gates])


def _report_metadata(traffic: CanaryTraffic) -> dict:
    rows = [{"role": role, **t.row(), "release": t.release[:12]}
            for role, t in (("current", traffic.current), ("candidate", traffic.candidate))]
    return {"candidate_release": traffic.candidate.release, "current_release": traffic.current.release,
            "traffic": table(rows, COLUMNS), MISSING_KEY: dg.MetadataValue.json(traffic.missing()),
            **traffic.gate_figures()}
