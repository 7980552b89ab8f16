"""The run lock: what the instance says was built, exported as one JSON document.

Per asset and partition: the hashes it consumed, its own hash and fingerprint, code version, the
git commit that built it, wall seconds, cost, the latest verdict of each of its checks, and the
reviewers' overrides of its gates. The lock also carries the validated manifest (paths made
absolute) and the current release of each model size, so `replay` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from llm_assets.checks.gates import GateOverride, list_overrides
from llm_assets.checks.results import check_verdicts
from llm_assets.cost_gate import META_COST_USD, META_ESTIMATED_COST_USD
from llm_assets.manifest import PipelineManifest
from llm_assets.release_pointer import current_release
from llm_assets.settings import code_revision
from llm_assets.store import ArtifactStore
from resources.handles import META_BUILD_SECONDS, META_GIT_COMMIT, current_materializations, input_records

LOCK_FORMAT = 1
ENTRY_FIELDS = ("asset", "partition", "group", "sha256", "inputs", "checks", "overrides")


class LockError(ValueError):
    """A lock file that cannot be read; the message names the file and what is wrong."""


def build_lock(defs: dg.Definitions, instance: dg.DagsterInstance, manifest: PipelineManifest,
               store: ArtifactStore) -> dict[str, Any]:
    graph = defs.resolve_asset_graph()
    overrides = list_overrides(store)
    entries = []
    for key in graph.toposorted_asset_keys:
        current = current_materializations(instance, key, graph.get(key).partitions_def)
        for partition, mat in sorted(current.items(), key=lambda i: i[0] or ""):
            meta = {k: v.value for k, v in mat.metadata.items()}
            sha = str(meta.get("sha256", ""))
            entries.append({
                "asset": key.to_user_string(),
                "partition": partition,
                "group": graph.get(key).group_name,
                "sha256": sha,
                "fingerprint": meta.get("fingerprint"),
                "inputs": input_records(mat),
                "code_version": meta.get("code_version"),
                "git_commit": meta.get(META_GIT_COMMIT),
                "wall_seconds": meta.get(META_BUILD_SECONDS, meta.get("wall_seconds")),  # of the build
                # What building the artifact cost (docs/costs.md); 0 for one built before costs were recorded.
                "cost_usd": float(meta.get(META_COST_USD, 0.0)),
                "estimated_cost_usd": meta.get(META_ESTIMATED_COST_USD),  # None: a step without an estimate
                "cache_hit": meta.get("cache_hit"),
                "checks": [v.as_record() for v in check_verdicts(instance, graph, key, partition)],
                "overrides": [asdict(o) for o in overrides
                              if o.asset == key.to_user_string() and o.partition == partition and o.sha256 == sha],
            })
    return {
        "format": LOCK_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": code_revision(),
        "pipeline": manifest.name,
        "manifest": manifest.model_dump(mode="json"),
        "releases": {size: current_release(store, size) for size in sorted(manifest.model_sizes)},
        "assets": entries,
    }


def write_lock(lock: dict[str, Any], path: Path) -> None:
    """Write atomically: a reader never sees half a lock."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(lock, indent=1, sort_keys=True, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def read_lock(path: Path) -> dict[str, Any]:
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock file; write one with `llm-assets lock --output {path}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LockError(f"{path}: not a JSON run lock ({exc})") from None
    if not isinstance(lock, dict) or lock.get("format") != LOCK_FORMAT:
        raise LockError(f"{path}: not a run lock of format {LOCK_FORMAT} (field 'format' is "
                        f"{lock.get('format') if isinstance(lock, dict) else type(lock).__name__!r})")
    missing = [f for f in ("manifest", "assets") if f not in lock]
    if missing:
        raise LockError(f"{path}: the lock lacks {', '.join(missing)}; export it again with `llm-assets lock`")
    for n, entry in enumerate(lock["assets"]):
        lacking = [f for f in ENTRY_FIELDS if not isinstance(entry, dict) or f not in entry]
        if lacking:
            raise LockError(f"{path}: assets[{n}] lacks {', '.join(lacking)}; export the lock again")
        for override in entry["overrides"]:
            try:
                GateOverride(**override)
            except TypeError as exc:
                raise LockError(f"{path}: assets[{n}] ({entry['asset']}) has a malformed override: {exc}") from None
    return lock
