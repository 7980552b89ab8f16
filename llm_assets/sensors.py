"""The alert sensor: every failed check evaluation and every failed run, sent once to the sinks.

Check executions are rows created when a check is *planned* and completed later, so their ids
do not arrive in completion order. The cursor therefore keeps a watermark (every execution at or
below it is settled) plus the ids above it that were already sent.
"""


import json
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

from resources.alert_sinks import Alert, AlertSinksResource

_HISTORY_LIMIT = 200
_RUN_BATCH = 200


@dataclass
class AlertCursor:
    check_watermark: int = 0
    checks_sent: list[int] = field(default_factory=list)
    runs: str | None = None

    @classmethod
    def parse(cls, raw: str | None) -> "AlertCursor":
        return cls(**json.loads(raw)) if raw else cls()

    def dump(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def _metadata_text(metadata: dict) -> dict[str, str]:
    return {key: str(getattr(value, "value", value)) for key, value in metadata.items()}


def check_alert(record: AssetCheckExecutionRecord) -> Alert:
    evaluation = record.event.dagster_event.event_specific_data if record.event else None
    severity = getattr(evaluation, "severity", None)
    return Alert(
        id=f"check:{record.id}",
        kind="check_failed",
        title=f"check {record.key.name} failed",
        description=(getattr(evaluation, "description", None) or ""),
        run_id=record.run_id,
        timestamp=record.create_timestamp,
        asset=record.key.asset_key.to_user_string(),
        partition=record.partition or getattr(evaluation, "partition", None),
        check=record.key.name,
        severity=severity.value if severity is not None else None,
        metadata=_metadata_text(getattr(evaluation, "metadata", {}) or {}),
    )


def collect_check_alerts(
    records: list[AssetCheckExecutionRecord], cursor: AlertCursor, run_finished: dict[str, bool]
) -> tuple[list[Alert], AlertCursor]:
    """Failed executions not sent yet, and the cursor that remembers them."""
    sent = set(cursor.checks_sent)
    fresh = [r for r in records if r.id > cursor.check_watermark and r.id not in sent]
    alerts = [check_alert(r) for r in fresh if r.status == AssetCheckExecutionRecordStatus.FAILED]
    # A planned execution of a run that is still going may yet fail: hold the watermark below it.
    pending = [
        r.id for r in fresh
        if r.status == AssetCheckExecutionRecordStatus.PLANNED and not run_finished.get(r.run_id, False)
    ]
    settled = [r.id for r in fresh if r.id not in pending]
    top = max([cursor.check_watermark, *settled])
    watermark = min(pending) - 1 if pending else top
    remembered = sorted(i for i in sent.union(settled) if i > watermark)
    return alerts, AlertCursor(watermark, remembered, cursor.runs)


def run_alert(record: dg.EventLogRecord) -> Alert:
    entry = record.event_log_entry
    return Alert(
        id=f"run:{entry.run_id}",
        kind="run_failed",
        title=f"run of {entry.job_name} failed",
        description=entry.message or (entry.dagster_event.message if entry.dagster_event else ""),
        run_id=entry.run_id,
        timestamp=entry.timestamp,
    )


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Sends failed asset checks (any severity) and failed runs to the alert sinks.",
)
def alert_sensor(context: dg.SensorEvaluationContext, alert_sinks: AlertSinksResource) -> dg.SkipReason:
    instance = context.instance
    cursor = AlertCursor.parse(context.cursor)

    records: list[AssetCheckExecutionRecord] = []
    for check_key in context.repository_def.asset_graph.asset_check_keys:
        records.extend(
            r for r in instance.event_log_storage.get_asset_check_execution_history(check_key, limit=_HISTORY_LIMIT)
            if r.id > cursor.check_watermark
        )
    planned_runs = {r.run_id for r in records if r.status == AssetCheckExecutionRecordStatus.PLANNED}
    run_finished = {}
    for run_id in planned_runs:
        run = instance.get_run_by_id(run_id)
        run_finished[run_id] = run is None or run.is_finished
    alerts, next_cursor = collect_check_alerts(records, cursor, run_finished)

    failures = instance.fetch_run_status_changes(
        dg.DagsterEventType.RUN_FAILURE, limit=_RUN_BATCH, cursor=cursor.runs, ascending=True
    )
    alerts.extend(run_alert(r) for r in failures.records)
    next_cursor.runs = failures.cursor if failures.records else cursor.runs

    alert_sinks.send(alerts)  # raises on delivery failure, so the cursor stays and it retries
    context.update_cursor(next_cursor.dump())
    return dg.SkipReason(f"sent {len(alerts)} alert(s)" if alerts else "no new failures")
