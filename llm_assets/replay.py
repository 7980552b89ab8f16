"""Replay a run lock into a fresh store and instance, and say how each artifact came out.

- identical: the same hash. Data and tokenizer stages must come out so: they are deterministic
  functions of the corpus and the manifest, and anything else is a reproducibility bug.
- equivalent: another hash, but every gate figure of the asset is within the relative tolerance
  of the recorded one (training is only bit-exact on the same hardware and library versions);
  an asset with no gate figure of its own is equivalent when all its inputs are.
- different: anything else, with the figures or hashes that differ.
- missing: the replay did not produce it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from llm_assets.checks.gates import GateOverride, store_override
from llm_assets.lock import build_lock
from llm_assets.manifest import load_manifest
from llm_assets.runner import materialize_graph
from llm_assets.settings import Settings, prepare_dagster_home
from llm_assets.store import open_store

IDENTICAL, EQUIVALENT, DIFFERENT, MISSING = "identical", "equivalent", "different", "missing"
BIT_EXACT_GROUPS = frozenset({"data", "tokenizer"})


@dataclass(frozen=True)
class ReplayRow:
    asset: str
    partition: str | None
    group: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in (IDENTICAL, EQUIVALENT)


def _gate_figures(entry: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each gate figure of an entry, with the magnitude of its gate's threshold (0 if none)."""
    figures = {}
    for check in entry.get("checks", []):
        values = check.get("values", {})
        for gate in check.get("gates", []):
            if values.get(gate) is None:
                continue
            bounds = [abs(v) for v in (values.get(f"gate_{gate}_min"), values.get(f"gate_{gate}_max"))
                      if v is not None and math.isfinite(v)]
            figures[gate] = (values[gate], max(bounds, default=0.0))
    return figures


def _relative(a: float, b: float, scale: float = 0.0) -> float:
    """The change from a to b relative to the larger of the two figures and their gate's
    threshold: a figure that is itself a small difference (a quantized model's perplexity
    increase, +0.07% then -0.05%) drifts against its gate's scale, not against zero."""
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), scale, 1e-12)


def compare_entry(recorded: dict[str, Any], replayed: dict[str, Any] | None, rtol: float,
                  input_status: dict[tuple[str, str | None], str]) -> ReplayRow:
    """How one replayed artifact compares with the lock's (inputs already compared)."""
    asset, partition, group = recorded["asset"], recorded["partition"], recorded.get("group") or ""
    row = lambda status, detail: ReplayRow(asset, partition, group, status, detail)  # noqa: E731
    if replayed is None:
        return row(MISSING, "the replay did not materialize it")
    before, after = recorded["sha256"], replayed["sha256"]
    if before == after:
        return row(IDENTICAL, before[:12])
    if group in BIT_EXACT_GROUPS:
        return row(DIFFERENT, f"{before[:12]} -> {after[:12]}; {group} stages must be bit-identical")
    old, new = _gate_figures(recorded), _gate_figures(replayed)
    shared = sorted(set(old) & set(new))
    if shared:
        drift = {gate: _relative(old[gate][0], new[gate][0], old[gate][1]) for gate in shared}
        shown = ", ".join(f"{g} {old[g][0]:.4g} -> {new[g][0]:.4g} ({drift[g]:.1%})" for g in shared)
        worst = max(drift.values())
        return row(EQUIVALENT if worst <= rtol else DIFFERENT, f"{shown}; tolerance {rtol:.1%}")
    inputs = [input_status.get((i["asset"], i["partition"]), MISSING) for i in recorded.get("inputs", [])]
    if inputs and all(s in (IDENTICAL, EQUIVALENT) for s in inputs):
        return row(EQUIVALENT, f"{before[:12]} -> {after[:12]}; no gate figure of its own, inputs equivalent")
    return row(DIFFERENT, f"{before[:12]} -> {after[:12]}")


def compare_locks(recorded: dict[str, Any], replayed: dict[str, Any], rtol: float) -> list[ReplayRow]:
    """Every entry of the recorded lock (upstream first, as locks list them) against the replay."""
    produced = {(e["asset"], e["partition"]): e for e in replayed["assets"]}
    status: dict[tuple[str, str | None], str] = {}
    rows = []
    for entry in recorded["assets"]:
        key = (entry["asset"], entry["partition"])
        result = compare_entry(entry, produced.get(key), rtol, status)
        status[key] = result.status
        rows.append(result)
    return rows


def replay_lock(lock: dict[str, Any], workdir: Path, *, rtol: float = 0.05, selection: str | None = None,
                log: Callable[[str], None] = print) -> list[ReplayRow]:
    """Materialize the lock's assets (or `selection` of them) from nothing in `workdir` (a fresh
    store and Dagster instance under the lock's manifest) and compare."""
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise FileExistsError(f"{workdir} is not empty; replay needs a fresh directory (it creates the store there)")
    manifest_path = workdir / "pipeline.yaml"
    manifest_path.write_text(yaml.safe_dump(lock["manifest"], sort_keys=False))
    manifest = load_manifest(manifest_path)
    # This machine's environment (the quantization interpreter, the executor), the lock's manifest,
    # a fresh store and alert log.
    settings = replace(Settings.from_env(), manifest=str(manifest_path), store_uri=str(workdir / "store"),
                       alerts_jsonl=str(workdir / "alerts.jsonl"), alert_webhook_url=None, s3_endpoint_url=None)
    store = open_store(settings.store_uri)
    # A reviewer's override holds for the very artifact it was given for: if the replay
    # reproduces that artifact, the override applies again.
    for entry in lock["assets"]:
        for override in entry.get("overrides", []):
            store_override(store, GateOverride(**override))

    from llm_assets.definitions import build_definitions

    defs = build_definitions(settings)
    locked = {entry["asset"] for entry in lock["assets"]}
    graph = defs.resolve_asset_graph()
    wanted = {k for k in graph.materializable_asset_keys if k.to_user_string() in locked}
    if selection:
        wanted &= dg.AssetSelection.from_string(selection).resolve(graph)
    if not wanted:
        raise ValueError(f"nothing to replay: the selection {selection!r} names no asset of the lock")
    names = {k.to_user_string() for k in wanted}
    with dg.DagsterInstance.local_temp(str(prepare_dagster_home(workdir / "dagster_home"))) as instance:
        materialize_graph(defs, instance, selection=" or ".join(f'key:"{n}"' for n in sorted(names)), log=log)
        replayed = build_lock(defs, instance, manifest, store)
    recorded = {**lock, "assets": [e for e in lock["assets"] if e["asset"] in names]}
    return compare_locks(recorded, replayed, rtol)
