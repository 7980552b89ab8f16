"""release: promote the evaluated model of one size when every gate of its lineage holds.

Blocking checks hold the downstream steps of their own run only; a later run that selects just
`release` would not see them. A policy trained on constitutional-AI pairs is judged beside its
lineage, by `policy_without_cai`'s `cai_refusal_rate_gate`: that asset is read as a parent too,
and a release without its verdict is refused. So the release reads back, from the instance, the latest verdict
of every blocking check of every asset partition it descends from, and refuses unless each one
passed on the artifact that is current now. It then stores `release.json` (model, eval report,
lineage, gate figures, the overrides it relies on) as an artifact and moves the size's "current release" pointer
to it (`llm_assets.release_pointer`); the previous release stays in the store and in the history.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from llm_assets.artifacts import InputRead, artifact_asset, canonical_json, materialize_artifact, verify_inputs
from llm_assets.checks.gates import list_overrides
from llm_assets.checks.results import (
    FAILED,
    CheckVerdict,
    _latest_evaluation,
    _verdict,
    current_materialization_record,
)
from llm_assets.evaluation.assets import REPORT_JSON, evaluated_stage
from llm_assets.evaluation.report import EvalReport, change_markdown
from llm_assets.manifest import CAI_GATE, PipelineManifest
from llm_assets.release_pointer import (
    FINE_TUNED_FROM,
    READS_RELEASE_POINTER,
    RELEASE_JSON,
    current_release,
    promote_or_propose,
    read_release,
    release_history,
)
from llm_assets.store import ArtifactStore
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, consumed_hash, current_materializations, latest_materializations
from resources.pipeline import PipelineResource

CAI_JUDGE = dg.AssetKey("policy_without_cai")  # llm_assets/evaluation/cai_gate.py


def current_model(store: ArtifactStore, step: str, size: str, release: ArtifactHandle) -> tuple[str, dict]:
    """The size's current release and the model it names: the pointer (which may have moved since
    `release` last materialized: a rollback, a promoted candidate), else `release`; its
    release.json is verified before it is read."""
    released = current_release(store, size) or release.sha256
    verify_inputs(store, step, [InputRead("release", size, released, (RELEASE_JSON,))])
    return released, read_release(store, released)["model"]


def lineage(instance: dg.DagsterInstance, asset_graph: BaseAssetGraph, parents: Sequence[dg.AssetKey],
            partition: str) -> Iterator[tuple[dg.AssetKey, str | None, dg.AssetMaterialization]]:
    """Every current materialization an asset with `parents` descends from in `partition`, upstream
    first: the same model size of size-partitioned ancestors, every current partition of the others."""
    ancestors = set().union(*(asset_graph.get_ancestor_asset_keys(key, include_self=True) for key in parents))
    for key in (k for k in asset_graph.toposorted_asset_keys if k in ancestors):
        partitions_def = asset_graph.get(key).partitions_def
        same_size = isinstance(partitions_def, dg.StaticPartitionsDefinition) and \
            partition in partitions_def.get_partition_keys()
        current = latest_materializations(instance, key, [partition]) if same_size else \
            current_materializations(instance, key, partitions_def)
        for part, mat in sorted(current.items(), key=lambda item: item[0] or ""):
            yield key, part, mat


def lineage_verdicts(instance: dg.DagsterInstance, asset_graph: BaseAssetGraph,
                     rows: Sequence[tuple[dg.AssetKey, str | None]]) -> list[CheckVerdict]:
    """`check_verdicts` of every asset partition of the lineage, in order, with the latest
    evaluations of every check of a partition read in one query (a query per check before). An
    evaluation still planned (its run skipped the check) says nothing: for that check, the
    latest one that evaluated is looked up on its own, as `check_verdicts` does."""
    done = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    latest: dict[tuple[dg.AssetCheckKey, str | None], object] = {}
    for part in dict.fromkeys(part for _, part in rows):
        keys = [c for key, p in rows if p == part for c in asset_graph.get(key).check_keys]
        found = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            keys, partition_filter=PartitionKeyFilter(key=part))
        latest.update({(key, part): record for key, record in found.items() if record.status in done})
    verdicts = []
    for key, part in rows:
        check_keys = sorted(asset_graph.get(key).check_keys, key=lambda k: k.name)
        if not check_keys:
            continue
        current = current_materialization_record(instance, key, part)
        verdicts.extend(_verdict(asset_graph.get(check), latest.get((check, part)) or
                                 _latest_evaluation(instance, check, part), current, part) for check in check_keys)
    return verdicts


def _refusal(name: str, held: list[CheckVerdict], partition: str) -> str:
    lines = [f"  {v.label}: {v.status}: {v.description.splitlines()[0] if v.description else ''}" for v in held]
    gates = sorted({g for v in held if v.status == FAILED for g in v.gates})
    command = f"`llm-assets override --gate {gates[0] if len(gates) == 1 else 'NAME'} --partition {partition} " \
              "--reviewer WHO --reason WHY`" if gates else ""
    hint = f"; or, on a reviewer's record, {command}" + (f" for each of {', '.join(gates)}" if len(gates) > 1 else "") \
        if gates else ""
    return (f"{name}[{partition}] refused: {len(held)} blocking check(s) of its lineage have not passed on the "
            f"current artifacts:\n" + "\n".join(lines) +
            f"\nFix the cause and rematerialize (or run `llm-assets verify` for checks that are stale){hint}.")


def _gate_table(verdicts: list[CheckVerdict]) -> str:
    rows = [f"| {v.asset}{f'[{v.partition}]' if v.partition else ''} | {v.check} | {v.status} | "
            + ", ".join(f"{g} {v.values[g]:.4g}" for g in v.gates if g in v.values) + " |"
            for v in verdicts if v.gates or not v.blocking or v.status != "passed"]
    hashes = sum(1 for v in verdicts if not v.gates and v.blocking and v.status == "passed")
    return ("| asset | check | verdict | figures |\n|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\n{hashes} other blocking check(s) passed (hash gates and data checks).")


def build_defs(manifest: PipelineManifest, lineage_graph: BaseAssetGraph) -> dg.Definitions:
    """The release of each model size (needs the evaluation stage: its report is what is promoted).

    `lineage_graph` is the asset graph of everything the release descends from, with every check
    (hash gates included): a run's own graph holds only what it executes, and the release must see
    every check of its lineage.
    """
    if manifest.stages.evaluation is None or not manifest.model_sizes:
        return dg.Definitions()
    model_asset = evaluated_stage(manifest)
    # The CAI gate sits on a sibling of the policy, not on an ancestor of the evaluated model.
    cai = manifest.stages.policy is not None and "cai_dataset" in manifest.stages.policy.preferences
    return dg.Definitions(assets=[release_asset(
        manifest, lineage_graph, name="release", model_asset=model_asset, eval_asset="eval_report",
        judges=[CAI_JUDGE] if cai else [],
        description=f"Promotes {model_asset} of one size once every blocking gate of its lineage has passed on "
                    "the current artifacts; moves that size's current-release pointer.")])


def release_asset(manifest: PipelineManifest, lineage_graph: BaseAssetGraph, *, name: str, model_asset: str,
                  eval_asset: str, description: str, judges: Sequence[dg.AssetKey] = (),
                  not_holding: Sequence[dg.AssetCheckKey] = (), fine_tune_of: str | None = None,
                  automation_condition: dg.AutomationCondition | None = None) -> dg.AssetsDefinition:
    """A release of `model_asset` of each size evaluated by `eval_asset`: stored once every blocking
    check of its lineage passed (also of `judges`, assets whose checks judge the model beside its
    lineage; but for the checks `not_holding`), then promoted, or proposed as the canary's candidate.
    `fine_tune_of`: the metadata entry of the model's materialization naming the release it was
    fine-tuned from, recorded in the document (a later re-store of that release does not displace it)."""
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))
    canary = manifest.stages.serving is not None and manifest.stages.serving.canary is not None
    parents = [dg.AssetKey(model_asset), dg.AssetKey(eval_asset), *judges]
    ignored = {(key.asset_key.to_user_string(), key.name) for key in not_holding}

    @artifact_asset(
        name=name, partitions_def=model_sizes, code_version="1", kinds={"json"}, group_name="release",
        tags=READS_RELEASE_POINTER, ins={"model": dg.AssetIn(key=model_asset), "eval_report": dg.AssetIn(eval_asset)},
        automation_condition=automation_condition, description=description,
    )
    def release(context: dg.AssetExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource,
                model: ArtifactHandle, eval_report: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, partition = artifact_store.get_store(), context.partition_key
        records, rows = [], []
        for key, part, mat in lineage(context.instance, lineage_graph, parents, partition):
            records.append({"asset": key.to_user_string(), "partition": part,
                            "sha256": str(mat.metadata["sha256"].value) if "sha256" in mat.metadata else None})
            rows.append((key, part))
        for judge in judges:
            if (judge, partition) not in rows:
                raise dg.Failure(f"{name}[{partition}] refused: the model is judged by {judge.to_user_string()}"
                                 f"[{partition}] (the policy trains on cai_dataset: its {CAI_GATE}_gate), which has "
                                 "not been materialized: materialize it, then the release")
        verdicts = lineage_verdicts(context.instance, lineage_graph, rows)
        held = [v for v in verdicts if v.holds_release and (v.asset, v.check) not in ignored]
        if held:
            raise dg.Failure(_refusal(name, held, partition), metadata={"held_by": [v.label for v in held]})
        _check_report_is_of(context, model_asset, model, eval_asset)
        # What is released, and nothing that varies with when it was judged (a check's description,
        # a baseline): the same lineage promoted again is the same release.
        in_lineage = {(r["asset"], r["partition"], r["sha256"]) for r in records}
        document = {
            "partition": partition,
            "model": model.as_input_record(),
            "eval_report": eval_report.as_input_record(),
            "lineage": records,
            "gate_values": {g: value for v in verdicts for g, value in v.gate_values().items() if math.isfinite(value)},
            "overrides": [asdict(o) for o in list_overrides(store) if (o.asset, o.partition, o.sha256) in in_lineage],
            **({FINE_TUNED_FROM: _fine_tuned_from(context, model_asset, fine_tune_of)} if fine_tune_of else {}),
        }

        def build(out: Path) -> dict:
            (out / RELEASE_JSON).write_text(canonical_json(document) + "\n")
            return {"lineage_assets": len(records), "checks_passed": sum(v.status == "passed" for v in verdicts)}

        # Read besides the inputs, for the change shown: the report of the release this one may
        # replace. Verified, with the new report, before anything is built.
        previous = current_release(store, partition)
        before = _report_of(store, partition, previous, eval_report) if previous else None
        result = materialize_artifact(context, store, kind="release", build=build, config=document,
                                      inputs={"model": model, "eval_report": eval_report},
                                      input_files={"model": ()})  # the release names the model, reads none of it
        sha = result.value.sha256
        if previous != sha:  # with a canary, a new release is a candidate until canary_report decides
            context.log.info(promote_or_propose(store, partition, sha, canary, by=f"run {context.run_id}"))
        compared = _change_against(store, previous, before, eval_report) if before and previous != sha else ""
        return dg.Output(result.value, data_version=result.data_version, metadata={
            **result.metadata,
            "model_sha256": model.sha256,
            "eval_report_sha256": eval_report.sha256,
            "previous_release": previous or "",
            **({FINE_TUNED_FROM: document[FINE_TUNED_FROM]} if fine_tune_of else {}),
            "releases_promoted": sum(m.action == "promote" for m in release_history(store, partition)),
            "gates": dg.MetadataValue.md(_gate_table(verdicts)),
            **({"change": dg.MetadataValue.md(compared)} if compared else {}),
        })

    return release


def _check_report_is_of(context: dg.AssetExecutionContext, model_asset: str, model: ArtifactHandle,
                        eval_asset: str) -> None:
    """Refuse a report that evaluated another model than the one released (the model was rebuilt
    after the report, in another run): its gates judged other weights."""
    partition = context.partition_key
    mat = latest_materializations(context.instance, dg.AssetKey(eval_asset), [partition]).get(partition)
    try:
        evaluated = consumed_hash(mat, model_asset, partition) if mat is not None else None
    except dg.DagsterInvariantViolationError:  # a report that recorded no model
        evaluated = None
    if evaluated != model.sha256:
        raise dg.Failure(
            f"{context.asset_key.to_user_string()}[{partition}] refused: {eval_asset}[{partition}] evaluated "
            f"{model_asset} {(evaluated or 'none')[:12]}, not the current {model.sha256[:12]}; materialize "
            f"{eval_asset}[{partition}] (its gates judge the model released), then this release")


def _fine_tuned_from(context: dg.AssetExecutionContext, model_asset: str, entry: str) -> str:
    """The release the model was fine-tuned from, as its current materialization records it."""
    mat = latest_materializations(context.instance, dg.AssetKey(model_asset), [context.partition_key])
    value = mat[context.partition_key].metadata.get(entry) if mat else None
    if value is None:
        raise dg.Failure(f"{context.asset_key.to_user_string()}[{context.partition_key}]: {model_asset}'s "
                         f"materialization records no {entry}; rematerialize {model_asset}")
    return str(value.value)


def _report_of(store, partition: str, release_sha: str, eval_report: ArtifactHandle) -> str:
    """The hash of the eval report of a release, once the files the change reads (that release's
    document, its report and the new report) are verified against their recorded hashes."""
    step = f"release[{partition}]"
    verify_inputs(store, step, [InputRead("release", partition, release_sha, (RELEASE_JSON,))])
    record = read_release(store, release_sha)["eval_report"]
    verify_inputs(store, step, [InputRead(record["asset"], record["partition"], record["sha256"], (REPORT_JSON,)),
                                InputRead.of(eval_report, (REPORT_JSON,))])
    return record["sha256"]


def _change_against(store, previous_release: str, before: str, eval_report: ArtifactHandle) -> str:
    """The new report's change against the report `before` of the release it replaces."""
    report, previous = (EvalReport.from_json(store.read_bytes(sha, REPORT_JSON).decode())
                        for sha in (eval_report.sha256, before))
    return change_markdown(report, previous, f"the previous release {previous_release[:12]}")
