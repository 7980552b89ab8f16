"""Typed artifact handles and the IO manager that passes them between steps.

A step never receives data from its parent, only a small handle (asset, partition, kind, hash,
URI). The handle is not stored anywhere of its own: it is read back from the parent's latest
materialization in the Dagster instance, so "the parent's current artifact" has one source of
truth that the UI, the IO manager and the input-chain gate all share.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg

# Metadata keys every artifact materialization carries.
META_SHA256 = "sha256"
META_URI = "uri"
META_BYTES = "bytes"
META_KIND = "artifact_kind"
META_INPUTS = "input_hashes"
META_FINGERPRINT = "fingerprint"
META_GIT_COMMIT = "git_commit"  # of the code that built the artifact
META_BUILD_SECONDS = "build_seconds"  # what building it took (a cache hit keeps the original's)
META_INPUT_BYTES_VERIFIED = "input_bytes_verified"  # input bytes re-hashed before the build (0 on a cache hit)
META_INPUT_VERIFY_SECONDS = "input_verify_seconds"  # what that took, within wall_seconds


@dataclass(frozen=True)
class ArtifactHandle:
    asset: str
    partition: str | None
    kind: str
    sha256: str
    uri: str
    bytes: int

    @property
    def label(self) -> str:
        return self.asset if self.partition is None else f"{self.asset}[{self.partition}]"

    def as_input_record(self) -> dict[str, Any]:
        return {"asset": self.asset, "partition": self.partition, "sha256": self.sha256}

    @classmethod
    def from_materialization(cls, mat: dg.AssetMaterialization) -> ArtifactHandle:
        meta = mat.metadata
        missing = [k for k in (META_SHA256, META_URI, META_KIND) if k not in meta]
        if missing:
            raise dg.DagsterInvariantViolationError(
                f"the latest materialization of {mat.asset_key.to_user_string()}"
                f"{'' if mat.partition is None else f'[{mat.partition}]'} carries no artifact "
                f"(metadata lacks {', '.join(missing)}); rematerialize it with this code"
            )
        return cls(
            asset=mat.asset_key.to_user_string(),
            partition=mat.partition,
            kind=str(meta[META_KIND].value),
            sha256=str(meta[META_SHA256].value),
            uri=str(meta[META_URI].value),
            bytes=int(meta[META_BYTES].value) if META_BYTES in meta else 0,
        )


def input_records(mat: dg.AssetMaterialization) -> list[dict[str, Any]]:
    """The input hashes a materialization recorded as consumed."""
    value = mat.metadata.get(META_INPUTS)
    if value is None:
        return []
    data = value.value
    return json.loads(data) if isinstance(data, str) else list(data)


def consumed_hash(mat: dg.AssetMaterialization, asset: str, partition: str | None = None) -> str:
    """The hash of ``asset`` (and partition) that a materialization recorded as consumed."""
    for record in input_records(mat):
        if record["asset"] == asset and record["partition"] == partition:
            return record["sha256"]
    raise dg.DagsterInvariantViolationError(
        f"{mat.asset_key.to_user_string()} recorded no input {asset}{f'[{partition}]' if partition else ''}"
    )


def latest_materializations(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Sequence[str] | None = None
) -> dict[str | None, dg.AssetMaterialization]:
    """The current materialization of an asset: per partition, or under ``None`` if unpartitioned.

    ``partitions=None`` on a partitioned asset means every partition ever materialized.
    """
    by_partition = instance.get_latest_storage_id_by_partition(
        asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions) if partitions else None
    )
    if by_partition:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=list(by_partition.values())),
            limit=len(by_partition),
        ).records
        return {r.asset_materialization.partition: r.asset_materialization for r in records}
    if partitions:
        return {}
    latest = instance.get_latest_materialization_event(asset_key)
    if latest is None or latest.asset_materialization is None:
        return {}
    return {latest.asset_materialization.partition: latest.asset_materialization}


def current_materializations(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions_def: dg.PartitionsDefinition | None
) -> dict[str | None, dg.AssetMaterialization]:
    """The latest materialization of each partition the asset still has: a corpus shard removed
    since (``llm-assets partitions prune``) is no longer part of the graph, whatever it left behind."""
    latest = latest_materializations(instance, asset_key)
    if partitions_def is None:
        return latest
    existing = set(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    return {partition: mat for partition, mat in latest.items() if partition in existing}


def current_handles(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Sequence[str] | None = None
) -> dict[str | None, ArtifactHandle]:
    return {
        partition: ArtifactHandle.from_materialization(mat)
        for partition, mat in latest_materializations(instance, asset_key, partitions).items()
    }


def materializations_in_run(
    instance: dg.DagsterInstance, run_id: str, asset_key: dg.AssetKey
) -> list[dg.AssetMaterialization]:
    records = instance.get_records_for_run(
        run_id=run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=100_000
    ).records
    mats = [r.asset_materialization for r in records]
    return [m for m in mats if m is not None and m.asset_key == asset_key]


class ArtifactHandleIOManager(dg.ConfigurableIOManager):
    """Outputs are handles described by the materialization's metadata; inputs are read back."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not isinstance(obj, ArtifactHandle):
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; assets on the "
                "artifact IO manager return the ArtifactHandle from materialize_artifact()"
            )

    def load_input(self, context: dg.InputContext) -> ArtifactHandle | Mapping[str, ArtifactHandle]:
        key = context.asset_key
        partitions = list(context.asset_partition_keys) if context.has_asset_partitions else None
        handles = current_handles(context.instance, key, partitions)
        wanted = partitions if partitions is not None else [None]
        missing = [p for p in wanted if p not in handles]
        if missing:
            shown = ", ".join("(unpartitioned)" if p is None else p for p in missing[:5])
            raise dg.DagsterInvariantViolationError(
                f"input {key.to_user_string()} has no materialization for: {shown}"
                f"{' …' if len(missing) > 5 else ''}. Materialize it first."
            )
        if partitions is None:
            return handles[None]
        # A parameter annotated as one ArtifactHandle takes its single partition (same-partition
        # dependency); any other annotation gets every upstream partition by key.
        if len(partitions) == 1 and context.dagster_type.typing_type is ArtifactHandle:
            return handles[partitions[0]]
        return {p: handles[p] for p in sorted(partitions)}


def handle_metadata(handle: ArtifactHandle) -> dict[str, Any]:
    """The metadata entries that describe a handle (inverse of ``from_materialization``)."""
    meta = asdict(handle)
    return {
        META_SHA256: meta["sha256"],
        META_URI: dg.MetadataValue.url(meta["uri"]) if "://" in meta["uri"] else meta["uri"],
        META_BYTES: meta["bytes"],
        META_KIND: meta["kind"],
    }
