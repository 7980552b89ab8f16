"""The verdicts the instance holds: for one asset partition, the latest evaluation of each of
its checks, and whether that evaluation judged the asset's *current* materialization.

Blocking checks stop downstream steps of the same run only. Whatever must respect a gate later
(the release, the run lock) reads the verdicts back from here instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from llm_assets.checks.gates import GATE_METADATA_KEY

PASSED, FAILED, NOT_RUN, STALE = "passed", "failed", "not run", "stale"


@dataclass(frozen=True)
class CheckVerdict:
    check: str
    asset: str
    partition: str | None
    status: str  # PASSED, FAILED, NOT_RUN (never evaluated), STALE (last judged an older artifact)
    blocking: bool
    severity: str  # ERROR or WARN, of a failure
    description: str
    gates: list[str] = field(default_factory=list)  # the manifest gates this check evaluates
    values: dict[str, float] = field(default_factory=dict)  # its numeric metadata
    texts: dict[str, str] = field(default_factory=dict)  # its other metadata (override records among them)
    run_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.asset}{f'[{self.partition}]' if self.partition else ''} {self.check}"

    @property
    def holds_release(self) -> bool:
        """A blocking check that has not passed on the current artifact (a WARN failure informs)."""
        if not self.blocking or self.status == PASSED:
            return False
        return not (self.status == FAILED and self.severity == "WARN")

    def gate_values(self) -> dict[str, float]:
        return {gate: self.values[gate] for gate in self.gates if gate in self.values}

    def as_record(self) -> dict:
        """For JSON: an unset threshold (NaN) becomes null."""
        values = {k: v if math.isfinite(v) else None for k, v in self.values.items()}
        return {"check": self.check, "status": self.status, "blocking": self.blocking, "severity": self.severity,
                "description": self.description, "gates": self.gates, "values": values, "texts": self.texts}


def current_materialization_record(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def check_verdicts(
    instance: dg.DagsterInstance, asset_graph, asset_key: dg.AssetKey, partition: str | None
) -> list[CheckVerdict]:
    """Every check of the asset, as last evaluated for this partition (None: unpartitioned)."""
    check_keys = sorted(asset_graph.get(asset_key).check_keys, key=lambda k: k.name)
    if not check_keys:
        return []
    current = current_materialization_record(instance, asset_key, partition)
    return [_verdict(asset_graph.get(key), _latest_evaluation(instance, key, partition), current, partition)
            for key in check_keys]


def _latest_evaluation(instance: dg.DagsterInstance, key: dg.AssetCheckKey, partition: str | None):
    """The latest execution that evaluated something: a planned check whose run skipped it (its
    asset was held upstream) stays PLANNED and says nothing about the artifact."""
    done = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    records = instance.event_log_storage.get_asset_check_execution_history(
        key, limit=1, status=done, partition_filter=PartitionKeyFilter(key=partition))
    return records[0] if records else None


def _verdict(node, record, current: dg.EventLogRecord | None, partition: str | None) -> CheckVerdict:
    gates = [g for g in str((node.metadata or {}).get(GATE_METADATA_KEY, "")).split(",") if g]
    base = {"check": node.key.name, "asset": node.key.asset_key.to_user_string(), "partition": partition,
            "blocking": node.blocking, "gates": gates}
    if record is None or record.event is None:
        return CheckVerdict(status=NOT_RUN, severity="ERROR", description="never evaluated", **base)
    evaluation = record.event.dagster_event.event_specific_data
    values = {k: float(v.value) for k, v in evaluation.metadata.items()
              if isinstance(v.value, (int, float)) and not isinstance(v.value, bool)}
    texts = {k: str(v.value) for k, v in evaluation.metadata.items() if k not in values}
    status = PASSED if evaluation.passed else FAILED
    if current is not None and not _judged(evaluation, record, current):
        status = STALE
    return CheckVerdict(status=status, severity=evaluation.severity.value, description=evaluation.description or "",
                        values=values, texts=texts, run_id=record.run_id, **base)


def _judged(evaluation, record, current: dg.EventLogRecord) -> bool:
    """Whether the evaluation was of the current materialization (not of an older artifact)."""
    target = evaluation.target_materialization_data
    if target is not None:
        return target.storage_id == current.storage_id
    return record.run_id == current.event_log_entry.run_id or record.create_timestamp >= current.timestamp
