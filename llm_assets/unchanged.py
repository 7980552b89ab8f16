"""What a drive may leave alone: the wave partitions whose every asset is what its last green run left.

An artifact's fingerprint is computed inside its asset's body, so the driver cannot know it without
launching the step, and launching a step costs a Dagster run (about a second) even when it is a
cache hit. What the driver can see is everything that feeds a fingerprint from outside the
inputs: the manifest, the files it names, the corpus shards' listings, the code, the installed
libraries (the quantization environment's too), the resources' configuration and the device.
Their digest, the *world*, is recorded for every asset partition a green run materialized (a run
that succeeded with no check failing at ERROR; a WARN verdict stands on the same artifact), in the
instance's key-value store, next to the materialization it made.

A later drive skips a partition of a wave when, for every asset of the wave: the world is the
same; the partition's current materialization is still the recorded one; its fingerprint is still
indexed to its artifact; the artifact verifies (once a drive, re-hashed unless its files are as
they were when it last verified in full: `ArtifactStore.verify_unless_unchanged`); and the input hashes it
recorded are its parents' current hashes; for an asset that reads its size's release pointers
(tagged `READS_RELEASE_POINTER`: the release, the server spec, the canary), the pointers are where
they were when it ran. Anything else (a changed file, manifest or code, a
missing or corrupt object, a parent rebuilt to other bytes) launches the run as before, and the
fingerprint decides there. A world that cannot be read (a base model on S3 or the hub, whose
listing only the step reads; a quantization environment that does not answer) skips nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import torch

import llm_assets
import resources
from llm_assets.artifacts import canonical_json
from llm_assets.manifest import PipelineManifest
from llm_assets.release_pointer import READS_RELEASE_POINTER, candidate_release, current_release
from llm_assets.store import ArtifactStore
from resources.handles import META_FINGERPRINT, META_SHA256, input_records
from resources.quantize_environment import QuantizeEnvironmentResource

KEY_PREFIX = "llm-assets/unchanged/"


def _files_signature(root: Path) -> list[list[Any]]:
    """(path, size, mtime) of a file, or of every file under a directory: a change to any shows."""
    if root.is_file():
        stat = root.stat()
        return [[str(root), stat.st_size, stat.st_mtime_ns]]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while listed: the next drive sees the change
                continue
            found.append([str(path), stat.st_size, stat.st_mtime_ns])
    return found


def _installed_distributions() -> list[list[Any]]:
    """Each installed distribution's metadata entry (`name-version.dist-info`) where libraries are
    installed, with its metadata file's mtime: an install, upgrade or removal renames, rewrites or
    removes one. Listing the folders takes a millisecond; parsing every distribution's metadata
    (importlib.metadata) took 0.2-0.6 s a drive.

    Read from the site directories and PYTHONPATH, not from all of sys.path: its first entry is
    where the command started (the working directory under `python -m`, the script's under
    `llm-assets`), so the project's own `*.egg-info` would make two ways of starting the same
    drive see two worlds, and each relaunch every run the other recorded."""
    found = []
    extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    for entry in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), *extra]):
        try:
            with os.scandir(entry or ".") as listing:
                named = sorted(item.path for item in listing if item.name.endswith((".dist-info", ".egg-info")))
        except OSError:  # a zip, or a folder that is not there
            continue
        for path in named:
            metadata = next((f for f in (f"{path}/METADATA", f"{path}/PKG-INFO", path) if os.path.isfile(f)), path)
            found.append([os.path.basename(path), os.stat(metadata).st_mtime_ns])
    return found


def _named_paths(value: Any) -> Iterable[str]:
    """Every absolute path string in the manifest (its validators make every path absolute)."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _named_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _named_paths(item)
    elif isinstance(value, str) and value.startswith("/"):
        yield value


def _remote_base_model(manifest: PipelineManifest) -> bool:
    """A base model read from S3 or the hub: its files' listing is read by the step only."""
    sizes = manifest.model_dump(mode="json").get("model_sizes") or {}
    return any(isinstance(size, Mapping) and "base_model" in size and not Path(size["base_model"]).exists()
               for size in sizes.values())


def world_digest(defs: dg.Definitions, manifest: PipelineManifest, shard_signatures: Mapping[str, str]) -> str | None:
    """The digest of everything outside the inputs that can change a fingerprint; None where some
    of it cannot be read, and then nothing is skipped."""
    if _remote_base_model(manifest):
        return None
    dumped = manifest.model_dump(mode="json")
    files = {path: _files_signature(Path(path)) for path in sorted(set(_named_paths(dumped))) if Path(path).exists()}
    code = [row for package in (llm_assets, resources) for row in _files_signature(Path(package.__file__).parent)
            if row[0].endswith(".py")]
    libraries = _installed_distributions()
    configured, quantize = {}, {}
    for name, resource in sorted(defs.resources.items()):
        if isinstance(resource, dg.ConfigurableResource):
            configured[name] = resource.model_dump(mode="json")
        if isinstance(resource, QuantizeEnvironmentResource):
            try:  # what the quantized artifacts' fingerprints hold
                quantize[name] = resource.libraries()
            except dg.Failure:
                return None
    world = {"manifest": dumped, "files": files, "shards": dict(sorted(shard_signatures.items())), "code": code,
             "libraries": libraries, "quantize": quantize, "resources": configured,
             "device": "cuda" if torch.cuda.is_available() else "cpu"}
    return hashlib.sha256(canonical_json(world).encode()).hexdigest()


def _entry_key(asset: dg.AssetKey, partition: str | None) -> str:
    return f"{KEY_PREFIX}{asset.to_user_string()}/{partition or ''}"


def _pointers(store: ArtifactStore, asset_graph, key: dg.AssetKey, partition: str | None) -> list[str | None] | None:
    """The size's release pointers (current, candidate) where the asset's artifact depends on them."""
    tags = asset_graph.get(key).tags
    if partition is None or any(tags.get(k) != v for k, v in READS_RELEASE_POINTER.items()):
        return None
    return [current_release(store, partition), candidate_release(store, partition)]


@dataclass(frozen=True)
class Unchanged:
    """An asset partition a drive left alone: the artifact it holds."""

    asset: str
    partition: str | None
    sha256: str


def _latest_records(instance: dg.DagsterInstance, key: dg.AssetKey, partitioned: bool,
                    partitions: Sequence[str | None]) -> dict[str | None, dg.EventLogRecord]:
    """The current materialization record of each partition (storage id and metadata)."""
    if not partitioned:
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1).records
        return {None: records[0]} if records else {}
    ids = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                      {str(p) for p in partitions})
    if not ids:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)).records
    return {r.asset_materialization.partition: r for r in records}


def _current_hashes(instance: dg.DagsterInstance, wanted: Mapping[str, set[str | None]],
                    known: Mapping[tuple, str]) -> dict[tuple, str]:
    """The current sha256 of each (asset, partition) asked for: `known`'s, else one lookup per
    parent asset that has any not known."""
    found = {pair: known[pair] for asset, partitions in wanted.items() for p in partitions
             if (pair := (asset, p)) in known}
    for asset, partitions in wanted.items():
        partitions = {p for p in partitions if (asset, p) not in known}
        if not partitions:
            continue
        named = [p for p in partitions if p is not None]
        records = _latest_records(instance, dg.AssetKey.from_user_string(asset), bool(named), named) if named \
            else _latest_records(instance, dg.AssetKey.from_user_string(asset), False, [None])
        for partition, record in records.items():
            sha = record.asset_materialization.metadata.get(META_SHA256)
            if sha is not None:
                found[(asset, partition)] = str(sha.value)
    return found


@dataclass
class DriveMemo:
    """What a drive has learnt, so that a later wave does not ask again: the hashes that verified
    (each object is re-hashed once a drive), and the current hash of every asset partition it left
    alone (no later wave materializes those: an asset belongs to one wave), read by the waves
    downstream as their inputs' current hashes without a query."""

    verified: set[str] = field(default_factory=set)
    current: dict[tuple[str, str | None], str] = field(default_factory=dict)


def unchanged_partitions(
    instance: dg.DagsterInstance, store: ArtifactStore, asset_graph, wave: Sequence[dg.AssetKey],
    partitions: Sequence[str | None], world: str | None, memo: DriveMemo,
) -> dict[str | None, list[Unchanged]]:
    """The partitions of the wave that need no run, with what each holds; `memo` is the drive's,
    read and added to."""
    if world is None or not partitions:
        return {}
    keys = {(k, p): _entry_key(k, p) for k in wave for p in partitions}
    entries = instance.run_storage.get_cursor_values(set(keys.values()))
    candidates: dict[tuple, dg.EventLogRecord] = {}
    for key in wave:
        partitioned = asset_graph.get(key).partitions_def is not None
        records = _latest_records(instance, key, partitioned, partitions)
        for partition in partitions:
            entry = json.loads(entries.get(keys[(key, partition)], "null"))
            record = records.get(str(partition) if partitioned else None)
            if (entry and record and entry["world"] == world and entry["storage_id"] == record.storage_id
                    and entry.get("pointers") == _pointers(store, asset_graph, key, partition)):
                candidates[(key, partition)] = record
    wanted: dict[str, set[str | None]] = {}
    for record in candidates.values():
        for read in input_records(record.asset_materialization):
            wanted.setdefault(read["asset"], set()).add(read["partition"])
    # A parent in this wave is read from its record just fetched: a wave's runs come after its skip.
    known = {**memo.current, **{(key.to_user_string(), record.asset_materialization.partition): str(sha.value)
                                for (key, _), record in candidates.items()
                                if (sha := record.asset_materialization.metadata.get(META_SHA256)) is not None}}
    parents = _current_hashes(instance, wanted, known)
    skipped: dict[str | None, list[Unchanged]] = {}
    for partition in partitions:
        held = [_held(store, key, candidates.get((key, partition)), parents, memo.verified) for key in wave]
        if all(h is not None for h in held):
            skipped[partition] = held
            memo.current.update(((h.asset, h.partition), h.sha256) for h in held)
    return skipped


def _held(store: ArtifactStore, key: dg.AssetKey, record: dg.EventLogRecord | None, parents: Mapping[tuple, str],
          verified: set[str]) -> Unchanged | None:
    """What the asset partition holds, if it is unchanged: indexed, verified, built from the current inputs."""
    if record is None:
        return None
    mat = record.asset_materialization
    meta = mat.metadata
    if META_SHA256 not in meta or META_FINGERPRINT not in meta:
        return None
    sha, fp = str(meta[META_SHA256].value), str(meta[META_FINGERPRINT].value)
    if any(parents.get((r["asset"], r["partition"])) != r["sha256"] for r in input_records(mat)):
        return None
    indexed = store.index_lookup(key.to_user_string(), mat.partition, fp)
    if indexed is None or indexed["artifact"] != sha:
        return None
    if sha not in verified:
        if not store.verify_unless_unchanged(sha).ok:
            return None
        verified.add(sha)
    return Unchanged(key.to_user_string(), mat.partition, sha)


def record_green_run(instance: dg.DagsterInstance, store: ArtifactStore, asset_graph,
                     result: dg.ExecuteInProcessResult, world: str | None) -> None:
    """Remember what a green run materialized (its partitions' current records, read as
    `unchanged_partitions` reads them), under the world it ran in."""
    if world is None:
        return
    done: dict[dg.AssetKey, list[str | None]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        done.setdefault(mat.asset_key, []).append(mat.partition)
    pairs = {}
    for key, partitions in done.items():
        partitioned = asset_graph.get(key).partitions_def is not None
        for partition, record in _latest_records(instance, key, partitioned, partitions).items():
            pairs[_entry_key(key, partition)] = json.dumps({
                "world": world, "storage_id": record.storage_id,
                "pointers": _pointers(store, asset_graph, key, partition)})
    if pairs:
        instance.run_storage.set_cursor_values(pairs)
