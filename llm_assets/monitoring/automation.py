"""`llm-assets automate --once`: one pass of what the daemon does, on the embedded instance.

Under `dagster dev` (or the daemon on a cluster) the `serving_traffic_sensor` and the
AutomationConditionSensor run on their own. Without a daemon, this pass does the same once: a tick
of the sensor (serving_traffic of every window whose logs closed), then ticks of
`evaluate_automation_conditions` (drift_report of the new windows, then feedback_dataset where the
drift gate failed or the feedback backlog is due) until one requests nothing. Both cursors are kept
in the instance, so a second pass with no new traffic runs nothing.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

SENSOR = "serving_traffic_sensor"
SENSOR_CURSOR, AUTOMATION_CURSOR = "llm-assets/automate/sensor", "llm-assets/automate/conditions"
MAX_TICKS = 10  # a chain of conditions is a few steps deep; more ticks than this is a cycle


@dataclass(frozen=True)
class AutomatedRun:
    asset: str
    partition: str | None
    success: bool
    run_id: str


def _run(defs: dg.Definitions, instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None,
         why: str) -> AutomatedRun:
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets(key),
                            partition_key=partition, instance=instance, resources=defs.resources,
                            raise_on_error=False, tags={"llm-assets/automate": why})
    return AutomatedRun(key.to_user_string(), partition, result.success, result.run_id)


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: Any,
          log: Callable[[str], None]) -> tuple[Any, list[AutomatedRun]]:
    """One evaluation of every automation condition, its cursor stored, and the runs it requests."""
    result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
    instance.run_storage.set_cursor_values({AUTOMATION_CURSOR: dg.serialize_value(result.cursor)})
    requested = sorted({(r.key, p) for r in result.results if isinstance(r.key, dg.AssetKey)
                        for p in result.get_requested_partitions(r.key)}, key=lambda kp: (kp[0], kp[1] or ""))
    runs = []
    for key, partition in requested:
        log(f"automation condition: {key.to_user_string()}" + (f"[{partition}]" if partition else ""))
        runs.append(_run(defs, instance, key, partition, "condition"))
    return result.cursor, runs


def automate_once(defs: dg.Definitions, instance: dg.DagsterInstance,
                  log: Callable[[str], None] = print) -> list[AutomatedRun]:
    """Tick the automation conditions (a first tick settles what the instance already holds: an
    update is new only against an earlier tick), then the traffic sensor once, then the conditions
    until nothing is requested; run every request in-process. Returns the runs, in order."""
    stored = instance.run_storage.get_cursor_values({SENSOR_CURSOR, AUTOMATION_CURSOR})
    cursor = dg.deserialize_value(stored[AUTOMATION_CURSOR]) if AUTOMATION_CURSOR in stored else None
    cursor, runs = _tick(defs, instance, cursor, log)
    if SENSOR in {sensor.name for sensor in defs.sensors or []}:
        tick = defs.get_sensor_def(SENSOR)(dg.build_sensor_context(
            instance=instance, definitions=defs, cursor=stored.get(SENSOR_CURSOR)))
        for request in tick.run_requests or []:
            log(f"{SENSOR}: serving_traffic[{request.partition_key}]")
            runs.append(_run(defs, instance, dg.AssetKey("serving_traffic"), request.partition_key, "sensor"))
        if tick.cursor:
            instance.run_storage.set_cursor_values({SENSOR_CURSOR: tick.cursor})
    for _ in range(MAX_TICKS):
        cursor, requested = _tick(defs, instance, cursor, log)
        if not requested:
            return runs
        runs += requested
    raise RuntimeError(f"the automation conditions still requested runs after {MAX_TICKS} ticks: a cycle?")
