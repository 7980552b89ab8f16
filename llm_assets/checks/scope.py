"""What a check looks at: the materializations of its asset that are under check right now."""

from collections.abc import Iterator

import dagster as dg

from resources.artifact_store import ArtifactStore
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


def artifacts_under_check(
    context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, partitioned: bool, store: ArtifactStore,
    *, verify: bool = True,
) -> Iterator[tuple[ArtifactHandle, dg.AssetMaterialization]]:
    """Handles of the artifacts under check, each verified before a domain check reads it."""
    for mat in materializations_under_check(context, asset_key, partitioned):
        handle = ArtifactHandle.from_materialization(mat)
        store.local_dir(handle.sha256, verify=verify)
        yield handle, mat
