"""Runs whose in-process driver was killed (`kill -9` of `llm-assets materialize`): each run the
driver launches names its process in a tag; a later drive marks failed the runs still in progress
whose process is certainly gone, and removes the staging folders their writers left.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable

import dagster as dg

from llm_assets.sensors import DRIVER_ALERTS, DRIVER_ALERTS_TAG, send_run_alerts
from llm_assets.store.fileio import STAGING_HEARTBEAT_SECONDS
from resources.alert_sinks import AlertSinksResource

# "host:pid:start" of the process that runs the run in-process (start: its start time in clock ticks
# after boot, from /proc, to tell a reused pid apart; empty where there is no /proc).
DRIVER_PROCESS_TAG = "llm-assets/driver-process"
IN_PROGRESS = (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING)
# A staging folder is debris when nothing touched it for this long — twice a live writer's heartbeat
# (`kept_fresh`; a killed writer stops touching) — beyond the start of every run still in progress.
STALE_STAGING_MARGIN_S = 2 * STAGING_HEARTBEAT_SECONDS


def _read_proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc; None without one."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def driver_process() -> str:
    """This process, as the driver tag names it."""
    stat = _read_proc_stat(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}:{stat[1] if stat else ''}"


def driver_is_gone(process: str) -> bool:
    """Whether the driver a run's tag names is certainly gone: it ran on this host, and its pid is
    free, a zombie or another process's now. A driver on another host is presumed alive."""
    try:
        host, pid, start = process.rsplit(":", 2)
    except ValueError:
        return False
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    stat = _read_proc_stat(int(pid))
    return stat is not None and (stat[0] == "Z" or bool(start) and stat[1] != start)


def sweep_killed_runs(
    instance: dg.DagsterInstance, check_keys: Iterable[dg.AssetCheckKey],
    alert_sinks: AlertSinksResource | None = None, log: Callable[[str], None] = print,
) -> list[dg.DagsterRun]:
    """Mark failed every run still in progress whose in-process driver is gone (killed), and send
    the alerts its driver could not (for the runs whose driver sends them)."""
    check_keys = list(check_keys)
    swept = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=list(IN_PROGRESS))):
        run = record.dagster_run
        process = run.tags.get(DRIVER_PROCESS_TAG)
        if not process or not driver_is_gone(process):
            continue
        host, pid, _ = process.rsplit(":", 2)
        instance.report_run_failed(run, (
            f"the driver of this run (pid {pid} on {host}) was killed before the run finished; "
            f"marked failed by the start-up sweep of llm-assets (pid {os.getpid()})"
        ))
        log(f"run {run.run_id} was left {run.status.value} by a killed driver (pid {pid}): marked failed")
        swept.append(run)
        if run.tags.get(DRIVER_ALERTS_TAG) == DRIVER_ALERTS:
            send_run_alerts(instance, run.run_id, check_keys, alert_sinks, log)
    return swept


def stale_staging_age(instance: dg.DagsterInstance, since: float) -> float:
    """The age past which a staging folder belongs to no live writer: untouched since before every run
    still in progress in the instance started and before `since` (when the caller began looking), by
    STALE_STAGING_MARGIN_S. A live writer touches its folder every STAGING_HEARTBEAT_SECONDS, and a
    writer of a run cannot have touched it last before the run started, so it is never older."""
    starts = [since, *(
        r.start_time or r.create_timestamp.timestamp()
        for r in instance.get_run_records(dg.RunsFilter(statuses=list(IN_PROGRESS)))
    )]
    return max(0.0, time.time() - min(starts)) + STALE_STAGING_MARGIN_S


def recover_killed_drivers(
    defs: dg.Definitions, instance: dg.DagsterInstance, log: Callable[[str], None] = print,
    alert_sinks: AlertSinksResource | None = None,
) -> tuple[list[dg.DagsterRun], list[str]]:
    """The driver's start-up sweep: runs left in progress by a killed driver are marked failed, then
    the store's staging folders older than every live run are removed. Returns both."""
    since = time.time()
    swept = sweep_killed_runs(instance, defs.resolve_asset_graph().asset_check_keys, alert_sinks, log)
    store = defs.resources["artifact_store"].get_store()
    removed = store.remove_stale_staging(stale_staging_age(instance, since))
    if removed:
        log(f"removed {len(removed)} staging folder(s) left by killed writers")
    return swept, list(removed)
