"""What a check looks at: the materializations of its asset that are under check right now."""

from collections.abc import Iterator

import dagster as dg

from llm_assets.store import ArtifactStore
from resources.handles import ArtifactHandle, latest_materializations, materializations_in_run


def materializations_under_check(
    context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, partitioned: bool
) -> list[dg.AssetMaterialization]:
    """The asset's materializations (of the check's partition) in this run; in a run that only
    executes checks, the current materialization of the partition."""
    partitions = list(context.partition_keys) if partitioned else None
    in_run = [
        m for m in materializations_in_run(context.instance, context.run.run_id, asset_key)
        if partitions is None or m.partition in partitions
    ]
    if in_run:
        return in_run
    return list(latest_materializations(context.instance, asset_key, partitions).values())


def partition_under_check(context: dg.AssetCheckExecutionContext,
                          asset_key: dg.AssetKey) -> dg.AssetMaterialization | None:
    """The one materialization a partitioned gate judges: the last of this run's for the check's
    partition, else the partition's current one; None when there is none."""
    mats = materializations_under_check(context, asset_key, True)
    return mats[-1] if mats else None


def nothing_to_check(asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                               description=f"no materialization of {asset_key.to_user_string()} to check")


def artifacts_under_check(
    context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, partitioned: bool, store: ArtifactStore,
    *, verify: bool = True,
) -> Iterator[tuple[ArtifactHandle, dg.AssetMaterialization]]:
    """Handles of the artifacts under check, each verified before a domain check reads it."""
    for mat in materializations_under_check(context, asset_key, partitioned):
        handle = ArtifactHandle.from_materialization(mat)
        store.local_dir(handle.sha256, verify=verify)
        yield handle, mat
