"""The alert sensor: every failed check evaluation and every failed run, sent once to the sinks.

Check executions are rows created when a check is *planned* and completed later, so their ids
do not arrive in completion order. The cursor therefore keeps a watermark (every execution at or
below it is settled) plus the ids above it that were already sent.

A run tagged ``llm-assets/alerts: driver`` is alerted by the process that ran it in-process (the
`llm-assets` CLI's embedded driver, ``llm_assets/runner.py``), which sends the same alerts
(``run_alerts``) as soon as the run ends; the sensor skips that run's check failures and its
failure, so with the daemon and the CLI both running nothing is sent twice.
"""


import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

from resources.alert_sinks import Alert, AlertDeliveryError, AlertSinksResource

_HISTORY_LIMIT = 200
_RUN_BATCH = 200
# The tag, and its value, of a run whose alerts its in-process driver sends (see the module's docstring).
DRIVER_ALERTS_TAG = "llm-assets/alerts"
DRIVER_ALERTS = "driver"


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


def settle_check_executions(
    executions: list[tuple[int, str, str]], cursor: AlertCursor, run_finished: dict[str, bool]
) -> tuple[list[int], AlertCursor]:
    """From (id, run_id, status) triples: the failed execution ids to send, and the next cursor."""
    sent = set(cursor.checks_sent)
    fresh = [e for e in executions if e[0] > cursor.check_watermark and e[0] not in sent]
    to_send = [id_ for id_, _, status in fresh if status == "FAILED"]
    # A planned execution of a run that is still going may yet fail: hold the watermark below it.
    pending = [id_ for id_, run_id, status in fresh if status == "PLANNED" and not run_finished.get(run_id, False)]
    settled = [id_ for id_, _, _ in fresh if id_ not in pending]
    watermark = min(pending) - 1 if pending else max([cursor.check_watermark, *settled, *sent])
    remembered = sorted(i for i in sent.union(settled) if i > watermark)
    return to_send, AlertCursor(watermark, remembered, cursor.runs)


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


def run_alerts(
    instance: dg.DagsterInstance, run_id: str, check_keys: Iterable[dg.AssetCheckKey]
) -> list[Alert]:
    """What the sensor sends for one run, formatted as it does: every failed evaluation of
    `check_keys` in the run, then the run's failure if it failed."""
    run = instance.get_run_record_by_id(run_id)
    started = run.create_timestamp.timestamp() if run is not None else 0.0
    records = [r for key in check_keys for r in _failed_since(instance, key, run_id, started)]
    alerts = [check_alert(r) for r in sorted(records, key=lambda r: r.id)]
    failures = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    alerts.extend(run_alert(r) for r in failures[-1:])
    return alerts


def _failed_since(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, run_id: str, started: float
) -> Iterator[AssetCheckExecutionRecord]:
    """The failed executions of one check in one run, paging back (newest first) to the run's
    start: a run with many partitions, or an old run swept late, is not cut off by the page size."""
    cursor = None
    while True:
        page = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=_HISTORY_LIMIT, cursor=cursor, status={AssetCheckExecutionRecordStatus.FAILED})
        yield from (r for r in page if r.run_id == run_id)
        if len(page) < _HISTORY_LIMIT or page[-1].create_timestamp < started:
            return
        cursor = page[-1].id


def _driver_alerted(instance: dg.DagsterInstance, run_ids: set[str]) -> set[str]:
    """Those of the runs whose driver sends their alerts itself."""
    if not run_ids:
        return set()
    records = instance.get_run_records(dg.RunsFilter(run_ids=sorted(run_ids), tags={DRIVER_ALERTS_TAG: DRIVER_ALERTS}))
    return {r.dagster_run.run_id for r in records}


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
    by_id = {r.id: r for r in records}
    to_send, next_cursor = settle_check_executions(
        [(r.id, r.run_id, r.status.value) for r in records], cursor, run_finished
    )
    failures = instance.fetch_run_status_changes(
        dg.DagsterEventType.RUN_FAILURE, limit=_RUN_BATCH, cursor=cursor.runs, ascending=True
    )
    # Runs whose in-process driver sends their alerts are settled here but not sent again.
    theirs = _driver_alerted(
        instance, {by_id[i].run_id for i in to_send} | {r.event_log_entry.run_id for r in failures.records}
    )
    alerts = [check_alert(by_id[i]) for i in sorted(to_send) if by_id[i].run_id not in theirs]
    alerts.extend(run_alert(r) for r in failures.records if r.event_log_entry.run_id not in theirs)
    next_cursor.runs = failures.cursor if failures.records else cursor.runs

    alert_sinks.send(alerts)  # raises on delivery failure, so the cursor stays and it retries
    context.update_cursor(next_cursor.dump())
    return dg.SkipReason(f"sent {len(alerts)} alert(s)" if alerts else "no new failures")


def send_run_alerts(
    instance: dg.DagsterInstance, run_id: str, check_keys: Iterable[dg.AssetCheckKey],
    alert_sinks: AlertSinksResource | None, log: Callable[[str], None] = print,
) -> None:
    """Send a finished run's alerts as the alert sensor would; a webhook that refuses them is reported,
    not raised (the JSONL file, written first, has them)."""
    if alert_sinks is None:
        return
    try:
        alert_sinks.send(run_alerts(instance, run_id, check_keys))
    except AlertDeliveryError as exc:
        log(f"  alerts of run {run_id}: {exc}")
