"""`llm-assets automate --once`: one pass of what the daemon does, on the embedded instance.

Under `dagster dev` (or the daemon on a cluster) the `serving_traffic_sensor` and the
AutomationConditionSensor run on their own. Without a daemon, this pass does the same once: a tick
of the sensor (serving_traffic of every window whose logs closed), then ticks of
`evaluate_automation_conditions` (drift_report of the new windows, then feedback_dataset where the
drift gate failed or the feedback backlog is due) until one requests nothing. Both cursors are kept
in the instance, so a second pass with no new traffic runs nothing. Each run's alerts (failed
checks, failed steps) are sent as the driver sends its own (`llm_assets.runner`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import dagster as dg

from llm_assets.runner import alert_unless_green, driver_tags
from resources.alert_sinks import AlertSinksResource

SENSOR = "serving_traffic_sensor"
SENSOR_CURSOR, AUTOMATION_CURSOR = "llm-assets/automate/sensor", "llm-assets/automate/conditions"
MAX_TICKS = 10  # a chain of conditions is a few steps deep; more ticks than this is a cycle


@dataclass(frozen=True)
class AutomatedRun:
    """One asset partition a pass materialized (or tried to): ok, failed (its step, or one of its
    blocking checks: the drift gate's failure is what starts the loop), or skipped (an upstream step
    of the same run failed, or one of its blocking checks did)."""

    asset: str
    partition: str | None
    status: Literal["ok", "failed", "skipped"]
    run_id: str
    failed_checks: tuple[str, ...] = ()

    @property
    def success(self) -> bool:
        return self.status == "ok"


def _run(defs: dg.Definitions, instance: dg.DagsterInstance, keys: list[dg.AssetKey], partition: str | None,
         why: str, alert_sinks: AlertSinksResource | None, log: Callable[[str], None]) -> list[AutomatedRun]:
    """One run of `keys` (one partition), as the daemon launches what a tick requests together: a
    blocking check that fails holds the steps after it in the same run."""
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets(*keys),
                            partition_key=partition, instance=instance, resources=defs.resources,
                            raise_on_error=False, tags={"llm-assets/automate": why,
                                                        **driver_tags("automate", alert_sinks)})
    graph = defs.resolve_asset_graph()
    alert_unless_green(instance, result, [c for k in keys for c in graph.get(k).check_keys], alert_sinks, log)
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    failed_steps = {e.step_key for e in result.get_step_failure_events()}
    runs = []
    for key in keys:
        failed = tuple(sorted(f"{e.asset_key.to_user_string()}:{e.check_name}"
                              for e in result.get_asset_check_evaluations() if not e.passed and e.asset_key == key))
        step_failed = key.to_python_identifier() in failed_steps
        status = "failed" if step_failed or failed else "ok" if key in materialized else "skipped"
        runs.append(AutomatedRun(key.to_user_string(), partition, status, result.run_id, failed))
    return runs


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: Any, alert_sinks: AlertSinksResource | None,
          log: Callable[[str], None]) -> tuple[Any, list[AutomatedRun]]:
    """One evaluation of every automation condition, its cursor stored, and the runs it requests: one
    run per partition, in the graph's order (a tick requests a whole chain at once: an asset whose
    parent will be requested is requested too)."""
    result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
    instance.run_storage.set_cursor_values({AUTOMATION_CURSOR: dg.serialize_value(result.cursor)})
    order = {key: index for index, key in enumerate(defs.resolve_asset_graph().toposorted_asset_keys)}
    by_partition: dict[str | None, list[dg.AssetKey]] = {}
    for key, partition in sorted(((r.key, p) for r in result.results if isinstance(r.key, dg.AssetKey)
                                  for p in result.get_requested_partitions(r.key)), key=lambda kp: order[kp[0]]):
        log(f"automation condition: {key.to_user_string()}" + (f"[{partition}]" if partition else ""))
        by_partition.setdefault(partition, []).append(key)
    runs = []
    for partition, keys in by_partition.items():  # dicts keep insertion order: upstream partitions first
        runs += _run(defs, instance, keys, partition, "condition", alert_sinks, log)
    return result.cursor, runs


def automate_once(defs: dg.Definitions, instance: dg.DagsterInstance, alert_sinks: AlertSinksResource | None = None,
                  log: Callable[[str], None] = print) -> list[AutomatedRun]:
    """Tick the automation conditions (a first tick settles what the instance already holds: an
    update is new only against an earlier tick), then the traffic sensor once, then the conditions
    until nothing is requested; run every request in-process, its alerts sent to `alert_sinks`.
    Returns the runs, in order."""
    stored = instance.run_storage.get_cursor_values({SENSOR_CURSOR, AUTOMATION_CURSOR})
    cursor = dg.deserialize_value(stored[AUTOMATION_CURSOR]) if AUTOMATION_CURSOR in stored else None
    cursor, runs = _tick(defs, instance, cursor, alert_sinks, log)
    if SENSOR in {sensor.name for sensor in defs.sensors or []}:
        tick = defs.get_sensor_def(SENSOR)(dg.build_sensor_context(
            instance=instance, definitions=defs, cursor=stored.get(SENSOR_CURSOR)))
        for request in tick.run_requests or []:
            log(f"{SENSOR}: serving_traffic[{request.partition_key}]")
            runs += _run(defs, instance, [dg.AssetKey("serving_traffic")], request.partition_key, "sensor",
                         alert_sinks, log)
        if tick.cursor:
            instance.run_storage.set_cursor_values({SENSOR_CURSOR: tick.cursor})
    for _ in range(MAX_TICKS):
        cursor, requested = _tick(defs, instance, cursor, alert_sinks, log)
        if not requested:
            return runs
        runs += requested
    raise RuntimeError(f"the automation conditions still requested runs after {MAX_TICKS} ticks: a cycle?")
