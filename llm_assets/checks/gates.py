"""Numeric gates: a metric against a threshold the manifest fixed before the run (absolute, or
relative to a baseline: the current release, or a model the stage measures on the same held-out
data: untrained, unigram, base), and the overrides a named reviewer can record for one gate on
one artifact.

An override is bound to the artifact it was given for (the gate's asset, partition and sha256):
a retrained model is judged afresh. Overrides live in the artifact store next to the artifacts
(`overrides/<gate>/<partition>/<sha256>.json`), so every instance reading the store honours them
and the run lock can list them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from llm_assets.manifest import GateSpec
from llm_assets.release_pointer import current_release_document
from llm_assets.store import ArtifactStore, index_key

OVERRIDES = "overrides"
GATE_METADATA_KEY = "gate"  # on a gate's asset check: the name of its entry in the manifest's gates


def gate_problems(gates: dict[str, GateSpec], name: str, value: float, label: str,
                  baseline: float | None = None) -> list[str]:
    """Why `value` (the metric of `label`, e.g. a partition) fails gates.`name`; empty if it passes.
    `baseline` is the figure a relative bound is measured from (None: there is none yet)."""
    gate = gates.get(name)
    if gate is None:
        return [f"no threshold: set gates.{name} (min and/or max) in the manifest"]
    if not math.isfinite(value):
        return [f"{label}: {name} is {value}"]
    problems = []
    if gate.min is not None and value < gate.min:
        problems.append(f"{label}: {name} {value:.4g} < gate min {gate.min:g}")
    if gate.max is not None and value > gate.max:
        problems.append(f"{label}: {name} {value:.4g} > gate max {gate.max:g}")
    if baseline is not None and gate.min_delta is not None and value < baseline + gate.min_delta:
        problems.append(f"{label}: {name} {value:.4g} < {gate.baseline} baseline {baseline:.4g} "
                        f"+ min_delta {gate.min_delta:g}")
    if baseline is not None and gate.max_delta is not None and value > baseline + gate.max_delta:
        problems.append(f"{label}: {name} {value:.4g} > {gate.baseline} baseline {baseline:.4g} "
                        f"+ max_delta {gate.max_delta:g}")
    return problems


def gate_metadata(gates: dict[str, GateSpec], name: str, baseline: float | None = None) -> dict[str, float]:
    """The thresholds, for a check's metadata (NaN where unset)."""
    gate = gates.get(name)
    nan = float("nan")
    metadata = {
        f"gate_{name}_min": gate.min if gate and gate.min is not None else nan,
        f"gate_{name}_max": gate.max if gate and gate.max is not None else nan,
    }
    if gate is not None and gate.baseline is not None:
        metadata[f"gate_{name}_baseline"] = baseline if baseline is not None else nan
        metadata[f"gate_{name}_min_delta"] = gate.min_delta if gate.min_delta is not None else nan
        metadata[f"gate_{name}_max_delta"] = gate.max_delta if gate.max_delta is not None else nan
    return metadata


def release_figure(store: ArtifactStore, name: str, partition: str | None, sha256: str) -> float | None:
    """What gate `name` recorded for the current release of the same model size. None before the
    first release, when the figure was not finite, and when the artifact under judgment is part of
    that release (it would be measured against itself)."""
    if partition is None:
        return None
    release = current_release_document(store, partition)
    if release is None or sha256 in {entry["sha256"] for entry in release.get("lineage", [])}:
        return None
    value = release.get("gate_values", {}).get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def baseline_figure(store: ArtifactStore, gate: GateSpec, name: str, partition: str | None, sha256: str,
                    measured: dict[str, float]) -> tuple[float | None, list[str]]:
    """The figure a relative gate is measured from, and why it cannot be judged. A release
    baseline may be missing (before the first release: the relative bound waits for one); a
    baseline the stage measures itself (`measured`: kind → figure) must be there and finite, or
    the gate fails: a relative bound with nothing to compare with would pass anything."""
    if gate.baseline is None:
        return None, []
    if gate.baseline == "release":
        return release_figure(store, name, partition, sha256), []
    label = partition or name
    if gate.baseline not in measured:
        kinds = ", ".join(sorted(measured)) or "none"
        return None, [f"{label}: gates.{name} is relative to the {gate.baseline} baseline, which this check does not "
                      f"measure (it measures: {kinds}; release works everywhere); change gates.{name}.baseline"]
    value = measured[gate.baseline]
    if not math.isfinite(value):
        return None, [f"{label}: the {gate.baseline} baseline of {name} is {value}"]
    return value, []


@dataclass(frozen=True)
class GateJudgement:
    passed: bool
    description: str  # empty when the gate simply holds
    metadata: dict[str, Any]  # the figure under `name`, the thresholds, any override
    failed: tuple[str, ...] = ()  # the gates that did not hold

    def warns_only(self, gates: dict[str, GateSpec]) -> bool:
        """Every gate that failed is one the manifest marks `blocking: false`: the failure informs
        (a WARN) and holds neither the next step nor the release."""
        return bool(self.failed) and all(name in gates and not gates[name].blocking for name in self.failed)


def judge_gate(store: ArtifactStore, gates: dict[str, GateSpec], name: str, value: float,
               partition: str | None, sha256: str, other_problems: list[str] | None = None,
               measured_baselines: dict[str, float] | None = None) -> GateJudgement:
    """One gate on one artifact: its thresholds (absolute and against the baseline: the current
    release's figure, or one of `measured_baselines`, kind → figure, that the stage measured on
    the same held-out data), plus any problems the check found besides, unless a reviewer
    overrode this gate for this artifact."""
    gate = gates.get(name)
    baseline, unjudged = (baseline_figure(store, gate, name, partition, sha256, measured_baselines or {})
                          if gate is not None else (None, []))
    problems = [*(other_problems or []), *unjudged, *gate_problems(gates, name, value, partition or name, baseline)]
    passed, why, override = verdict(store, name, partition, sha256, problems)
    return GateJudgement(passed, why, {name: value, **gate_metadata(gates, name, baseline), **override},
                         () if passed else (name,))


def judge_gates(store: ArtifactStore, gates: dict[str, GateSpec], figures: dict[str, float],
                partition: str | None, sha256: str,
                problems_by_gate: dict[str, list[str]] | None = None,
                baselines_by_gate: dict[str, dict[str, float]] | None = None) -> GateJudgement:
    """Several gates of one check on one artifact, each judged (and overridable) on its own; the
    metadata keys of each gate's thresholds and override are prefixed with its name (a single
    gate's are as `judge_gate` gives them)."""
    problems_by_gate, baselines_by_gate = problems_by_gate or {}, baselines_by_gate or {}
    if len(figures) == 1:
        [(name, value)] = figures.items()
        return judge_gate(store, gates, name, value, partition, sha256, problems_by_gate.get(name),
                          baselines_by_gate.get(name))
    problems, metadata, failed = [], {}, []
    for name, value in figures.items():
        judged = judge_gate(store, gates, name, value, partition, sha256, problems_by_gate.get(name),
                            baselines_by_gate.get(name))
        if not judged.passed:
            problems.append(judged.description)
            failed.append(name)
        metadata.update({k if k.startswith((name, "gate_")) else f"{name}.{k}": v for k, v in judged.metadata.items()})
    return GateJudgement(not problems, "; ".join(problems), metadata, tuple(failed))


@dataclass(frozen=True)
class GateOverride:
    gate: str
    asset: str
    partition: str | None
    sha256: str  # the artifact the override was given for
    reviewer: str
    reason: str
    recorded_at: str  # ISO 8601, UTC

    @property
    def key(self) -> str:
        return index_key(self.gate, self.partition, self.sha256, namespace=OVERRIDES)

    def as_metadata(self) -> dict[str, str]:
        return {"override_reviewer": self.reviewer, "override_reason": self.reason,
                "override_recorded_at": self.recorded_at}


def record_override(store: ArtifactStore, gate: str, asset: str, partition: str | None, sha256: str,
                    reviewer: str, reason: str) -> GateOverride:
    if not reviewer.strip() or not reason.strip():
        raise ValueError("an override needs a reviewer and a reason: both are recorded in the run lock")
    return store_override(store, GateOverride(gate, asset, partition, sha256, reviewer.strip(), reason.strip(),
                                              datetime.now(UTC).isoformat(timespec="seconds")))


def store_override(store: ArtifactStore, override: GateOverride) -> GateOverride:
    """Write an override record (a new one, or one carried over from a run lock)."""
    store.backend.write_key(override.key, json.dumps(asdict(override), sort_keys=True).encode())
    return override


def find_override(store: ArtifactStore, gate: str, partition: str | None, sha256: str) -> GateOverride | None:
    data = store.backend.read_key(index_key(gate, partition, sha256, namespace=OVERRIDES))
    return GateOverride(**json.loads(data)) if data is not None else None


def list_overrides(store: ArtifactStore) -> list[GateOverride]:
    """Every override recorded in the store, oldest first."""
    found = [GateOverride(**json.loads(store.backend.read_key(key) or b"{}"))
             for key in store.backend.list_keys(f"{OVERRIDES}/")]
    return sorted(found, key=lambda o: (o.recorded_at, o.gate, o.partition or ""))


def verdict(store: ArtifactStore, gate: str, partition: str | None, sha256: str,
            problems: list[str]) -> tuple[bool, str, dict[str, str]]:
    """(passed, description, extra metadata) of a gate on one artifact: its problems, unless a
    reviewer overrode this gate for this very artifact."""
    if not problems:
        return True, "", {}
    override = find_override(store, gate, partition, sha256)
    if override is None:
        return False, "; ".join(problems), {}
    return True, (f"overridden by {override.reviewer} ({override.reason}); would fail: "
                  + "; ".join(problems)), override.as_metadata()
