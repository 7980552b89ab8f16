"""Fingerprints and early cutoff: the one way every asset turns work into a stored artifact.

An asset body calls :func:`materialize_artifact` with its recipe, its input handles and a
``build`` function that writes files into a directory. If the same fingerprint was built before
and its object still verifies, the stored artifact is returned without calling ``build``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel

from llm_assets.compute import requests_gpu
from llm_assets.settings import code_revision
from llm_assets.store import ArtifactStore
from resources.handles import (
    META_BUILD_SECONDS,
    META_FINGERPRINT,
    META_GIT_COMMIT,
    META_INPUTS,
    ArtifactHandle,
    handle_metadata,
)

Inputs = Mapping[str, ArtifactHandle | Mapping[str, ArtifactHandle]]
BuildFn = Callable[[Path], Mapping[str, Any] | None]


def canonical_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def flatten_inputs(inputs: Inputs) -> list[ArtifactHandle]:
    """Every input handle, sorted by (asset, partition) so order of arguments never matters."""
    handles: list[ArtifactHandle] = []
    for value in inputs.values():
        handles.extend(value.values() if isinstance(value, Mapping) else [value])
    return sorted(handles, key=lambda h: (h.asset, h.partition or ""))


def fingerprint(
    asset: str,
    partition: str | None,
    code_version: str | None,
    config: Any,
    input_hashes: list[str],
) -> str:
    """sha256 of everything that determines an artifact: same fingerprint, same artifact."""
    body = {
        "asset": asset,
        "partition": partition,
        "code_version": code_version,
        "config": json.loads(canonical_json(config)),
        "inputs": sorted(input_hashes),
    }
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# The lifecycle's parts: an asset's group_name, and its `stage` tag.
STAGES = ("data", "tokenizer", "pretrain", "posttrain", "evaluation", "quantize", "release", "serving")
# Who answers for each part's assets (shown in the UI, selectable as `owner:"team:ml-platform"`).
# One team owns the whole lifecycle today; give a part its own team here.
STAGE_OWNERS = {stage: "team:ml-platform" for stage in STAGES}


def asset_tags(group_name: str, op_tags: Mapping[str, Any] | None) -> dict[str, str]:
    """The tags every asset carries: `stage` (its group) and `compute` (`gpu` when its step asks
    Kubernetes for a GPU through `llm_assets.compute.k8s_op_tags`, else `cpu`)."""
    if group_name not in STAGES:
        raise ValueError(f"group_name {group_name!r} is not a lifecycle stage ({', '.join(STAGES)})")
    return {"stage": group_name, "compute": "gpu" if requests_gpu(dict(op_tags or {})) else "cpu"}


def artifact_asset(**kwargs: Any) -> Callable:
    """``@dg.asset`` for assets whose output is an artifact handle: they all use the artifact IO
    manager, which passes handles (never data) to their children. Each gets its stage's owner and
    the `stage` and `compute` tags (:func:`asset_tags`), derived from ``group_name`` and
    ``op_tags``; owners or tags given by the caller are added to those."""
    group = kwargs.get("group_name")
    if group is None:
        raise ValueError("artifact_asset needs a group_name: the lifecycle stage the asset belongs to")
    tags = asset_tags(group, kwargs.get("op_tags"))  # refuses a group that is not a stage
    kwargs["owners"] = list(dict.fromkeys([STAGE_OWNERS[group], *kwargs.get("owners", [])]))
    kwargs["tags"] = {**tags, **kwargs.get("tags", {})}
    return dg.asset(io_manager_key="artifact_io", **kwargs)


def part_digest(store: ArtifactStore, handle: ArtifactHandle, relpath: str, remedy: str) -> str:
    """The sha256 of one file of an artifact: what a step reading only that part fingerprints
    (with the artifact itself passed as a narrowed input)."""
    for entry in store.manifest(handle.sha256).files:
        if entry.path == relpath:
            return entry.sha256
    raise dg.Failure(f"{handle.label} {handle.sha256[:12]} has no {relpath}; {remedy}")


def fingerprint_of(context: dg.AssetExecutionContext, config: Any = None, inputs: Inputs | None = None) -> str:
    """The fingerprint ``materialize_artifact`` will use for this step, for work that must key
    its own progress (resumable training) by it."""
    return fingerprint(
        context.asset_key.to_user_string(),
        context.partition_key if context.has_partition_key else None,
        context.assets_def.code_versions_by_key.get(context.asset_key),
        config,
        [h.sha256 for h in flatten_inputs(inputs or {})],
    )


def materialize_artifact(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    *,
    kind: str,
    build: BuildFn,
    config: Any = None,
    inputs: Inputs | None = None,
    narrowed_inputs: Inputs | None = None,
) -> dg.Output[ArtifactHandle]:
    """Build (or reuse) this asset partition's artifact and describe it for the UI.

    ``config`` must hold everything outside the inputs that changes the result: the recipe,
    and for assets that read external files, a signature of those files. ``build`` writes the
    artifact's files into the directory it is given and may return extra metadata (JSON-able
    values or Dagster ``MetadataValue``s); that metadata is cached with the artifact.

    ``narrowed_inputs`` are recorded in the lineage (and checked by the input-chain gate) but do
    not enter the fingerprint: for an asset that reads only its own part of a shared artifact,
    the caller puts the digest of that part into ``config`` instead, so a change elsewhere in the
    shared artifact leaves this partition a cache hit.
    """
    started = time.perf_counter()
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    fp = fingerprint_of(context, config, inputs)
    handles = sorted(
        [*flatten_inputs(inputs or {}), *flatten_inputs(narrowed_inputs or {})],
        key=lambda h: (h.asset, h.partition or ""),
    )

    cached = store.index_lookup(asset, partition, fp)
    cache_hit = False
    if cached is not None:
        report = store.verify(cached["artifact"])
        if report.ok:
            cache_hit = True
            ref = store.ref(cached["artifact"])
            extra = dg.deserialize_value(cached["metadata"]) if cached.get("metadata") else {}
            context.log.info(f"{asset}: cache hit for fingerprint {fp[:12]} -> {ref.sha256[:12]}")
        else:
            context.log.warning(
                f"{asset}: cached artifact {cached['artifact'][:12]} failed verification "
                f"({'; '.join(report.problems)}); rebuilding"
            )
    if not cache_hit:
        with store.staging_dir() as workdir:
            extra = dict(build(workdir) or {})
            ref = store.put_dir(workdir, move=True, progress=_progress_logger(context, asset))
        # What the build took and the commit that built it travel with the artifact: a cache hit
        # reports those, next to its own wall_seconds.
        extra.update({META_BUILD_SECONDS: round(time.perf_counter() - started, 3), META_GIT_COMMIT: code_revision()})
        store.index_record(asset, partition, fp, ref.sha256, dg.serialize_value(extra))

    handle = ArtifactHandle(
        asset=asset, partition=partition, kind=kind, sha256=ref.sha256, uri=ref.uri, bytes=ref.bytes
    )
    metadata = {
        **handle_metadata(handle),
        "files": ref.files,
        META_FINGERPRINT: fp,
        META_INPUTS: dg.MetadataValue.json([h.as_input_record() for h in handles]),
        "code_version": code_version or "",
        "cache_hit": cache_hit,
        "wall_seconds": round(time.perf_counter() - started, 3),
        **extra,
    }
    return dg.Output(handle, data_version=dg.DataVersion(ref.sha256), metadata=metadata)


def _progress_logger(context: dg.AssetExecutionContext, asset: str) -> Callable[[str, int, int], None]:
    """Log store writes at most every 10% so long uploads show progress without flooding."""
    state = {"next": 0.1}

    def report(path: str, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if fraction >= state["next"] or done == total:
            context.log.info(f"{asset}: stored {done / 1e6:.1f}/{total / 1e6:.1f} MB ({path})")
            state["next"] = fraction + 0.1

    return report
