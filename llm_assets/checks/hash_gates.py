"""Hash gates, generated for every artifact asset rather than written by hand.

- ``artifact_integrity``: re-hash the stored object of each materialization under check and
  compare with its manifest. A flipped byte fails it and names the file. An object that already
  verified in the same run (the cache hit that reused it) is not re-hashed (``verify_once``).
- ``input_chain`` (assets with parents only): the input hashes a materialization recorded are
  the parents' current hashes. A downstream artifact built from a parent that has since
  changed fails it and names the parent.

Both are blocking with severity ERROR: a failure skips every downstream step of the same run.
An asset's two gates run in one step (one op, ``<asset>_hash_gates``), each with its own verdict.

Each gate is partitioned like its asset, so the UI shows a verdict per partition; what it looks
at is decided by ``checks.scope``.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence

import dagster as dg

from llm_assets.artifacts import verify_once
from llm_assets.checks.scope import materializations_under_check
from llm_assets.store import ArtifactStore
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, current_handles, input_records

INTEGRITY = "artifact_integrity"
INPUT_CHAIN = "input_chain"
_MAX_LISTED = 20


def _label(mat: dg.AssetMaterialization) -> str:
    name = mat.asset_key.to_user_string()
    return name if mat.partition is None else f"{name}[{mat.partition}]"


def _result(check: str, checked: list[dg.AssetMaterialization], problems: list[str], what: str
            ) -> dg.AssetCheckResult:
    if not checked:
        return dg.AssetCheckResult(
            check_name=check,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description="nothing to check: the asset has no materialization; materialize it first",
        )
    return dg.AssetCheckResult(
        check_name=check,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{len(checked)} {what} verified" if not problems else "\n".join(problems[:_MAX_LISTED])),
        metadata={
            "checked": len(checked),
            "failures": len(problems),
            "partitions": dg.MetadataValue.json(sorted(m.partition or "" for m in checked)[:200]),
        },
    )


def _integrity_result(
    store: ArtifactStore, run_id: str, checked: list[dg.AssetMaterialization]
) -> dg.AssetCheckResult:
    problems = []
    for mat in checked:
        handle = ArtifactHandle.from_materialization(mat)
        report = verify_once(store, run_id, handle.sha256)
        problems.extend(f"{_label(mat)} ({handle.sha256[:12]}): {p}" for p in report.problems)
    return _result(INTEGRITY, checked, problems, "artifact(s)")


def _input_chain_result(
    instance: dg.DagsterInstance, parent_keys: Sequence[dg.AssetKey], parent_of: Mapping[str, set[str]],
    checked: list[dg.AssetMaterialization],
) -> dg.AssetCheckResult:
    current = _consumed_parents_now(instance, parent_keys, checked)
    problems = []
    for mat in checked:
        records = input_records(mat)
        consumed = {r["asset"] for r in records}
        for missing in sorted(set(current) - consumed):
            if missing in parent_of and mat.partition not in parent_of[missing]:
                continue
            problems.append(f"{_label(mat)}: recorded no input from parent {missing}")
        for record in records:
            parent = current.get(record["asset"], {}).get(record["partition"])
            name = record["asset"] + (f"[{record['partition']}]" if record["partition"] else "")
            if parent is None:
                problems.append(f"{_label(mat)}: consumed {name}, which has no current materialization")
            elif parent.sha256 != record["sha256"]:
                problems.append(
                    f"{_label(mat)}: consumed {name} {record['sha256'][:12]} but its current "
                    f"hash is {parent.sha256[:12]}; rematerialize {_label(mat)}"
                )
    return _result(INPUT_CHAIN, checked, problems, "input chain(s)")


def _hash_gates(
    asset_key: dg.AssetKey, partitions_def: dg.PartitionsDefinition | None, parents: Iterable[dg.AssetKey],
    parent_of: Mapping[str, set[str]],
) -> dg.AssetChecksDefinition:
    """Both gates of one asset in one step: a step of its own per gate cost every run of the
    asset a Dagster step (its events and commits) for a few hash comparisons.

    `parent_of`: a parent that only some partitions read (a static partition mapping), with those
    partitions; a materialization of another partition is not expected to record it."""
    parent_keys = sorted(parents, key=lambda k: k.to_user_string())
    specs = [dg.AssetCheckSpec(
        INTEGRITY, asset=asset_key, partitions_def=partitions_def, blocking=True,
        description="Re-hashes the stored artifact and compares every file with its manifest.")]
    if parent_keys:
        specs.append(dg.AssetCheckSpec(
            INPUT_CHAIN, asset=asset_key, partitions_def=partitions_def, blocking=True,
            description="The input hashes each materialization consumed are its parents' current hashes: "
                        + ", ".join(k.to_user_string() for k in parent_keys)))

    @dg.multi_asset_check(
        name=f"{asset_key.to_python_identifier()}_hash_gates",
        specs=specs,
        can_subset=True,  # the UI may run one gate alone
        description=f"The hash gates of {asset_key.to_user_string()}.",
    )
    def hash_gates(
        context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource
    ) -> Iterator[dg.AssetCheckResult]:
        checked = materializations_under_check(context, asset_key, partitions_def is not None)
        selected = {key.name for key in context.selected_asset_check_keys}
        if INTEGRITY in selected:
            yield _integrity_result(artifact_store.get_store(), context.run.run_id, checked)
        if INPUT_CHAIN in selected:
            yield _input_chain_result(context.instance, parent_keys, parent_of, checked)

    return hash_gates


def _consumed_parents_now(
    instance: dg.DagsterInstance, parent_keys: Sequence[dg.AssetKey], checked: Iterable[dg.AssetMaterialization]
) -> dict[str, dict[str | None, ArtifactHandle]]:
    """The current handles of the parent partitions the checked materializations consumed, per
    parent: only those are looked up, so a check of one shard does not read every shard's history."""
    consumed: dict[str, set[str | None]] = {key.to_user_string(): set() for key in parent_keys}
    for mat in checked:
        for record in input_records(mat):
            consumed.get(record["asset"], set()).add(record["partition"])
    current: dict[str, dict[str | None, ArtifactHandle]] = {}
    for key in parent_keys:
        partitions = consumed[key.to_user_string()]
        named = sorted(p for p in partitions if p is not None)
        current[key.to_user_string()] = current_handles(instance, key, named) if named else \
            current_handles(instance, key) if None in partitions else {}
    return current


def _static_parents(assets_def: dg.AssetsDefinition, parents: Iterable[dg.AssetKey]) -> dict[str, set[str]]:
    """The parents read through a static partition mapping, with the partitions that read them."""
    mapped = {}
    for parent in parents:
        mapping = assets_def.get_partition_mapping_for_dep(parent)
        if isinstance(mapping, dg.StaticPartitionMapping):
            mapped[parent.to_user_string()] = {
                key for keys in mapping.downstream_partition_keys_by_upstream_partition_key.values()
                for key in ([keys] if isinstance(keys, str) else keys)}
    return mapped


def build_hash_gates(assets: Iterable[dg.AssetsDefinition]) -> list[dg.AssetChecksDefinition]:
    """The hash gates of every asset: integrity always, input chain where the asset has parents."""
    checks = []
    for assets_def in assets:
        for key in assets_def.keys:
            parents = assets_def.asset_deps.get(key, set())
            checks.append(_hash_gates(key, assets_def.specs_by_key[key].partitions_def, parents,
                                      _static_parents(assets_def, parents)))
    return checks
