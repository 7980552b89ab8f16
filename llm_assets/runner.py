"""Materialize the asset graph in-process on one Dagster instance: the embedded default's driver.

In production the daemon, sensors and backfills launch runs. On a laptop this driver does the
same work in order: it registers the corpus shards the landing sensor would find, then runs
waves of assets that share a partitioning, one run per partition, with every check attached.
A wave that fails stops the drive: its downstream would be blocked anyway.

Each run carries the driver's process (host, pid, start) in a tag, so that a later drive can tell
a run whose driver was killed (`kill -9`) from one still going (`llm_assets.killed_drivers`). With `alert_sinks`, the
driver sends the alerts of the runs it ran (failed checks, WARN included, and failed runs) itself,
as the alert sensor formats them; the sensor skips those runs (`DRIVER_ALERTS_TAG`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

from llm_assets.data.partitions import corpus_shards
from llm_assets.data.sources import (
    PRUNE_COMMAND,
    SourceListingError,
    SourceProblem,
    classify_partitions,
    discover_sources,
)
from llm_assets.killed_drivers import DRIVER_PROCESS_TAG, driver_process
from llm_assets.sensors import DRIVER_ALERTS, DRIVER_ALERTS_TAG, send_run_alerts
from llm_assets.unchanged import DriveMemo, record_green_run, unchanged_partitions, world_digest
from resources.alert_sinks import AlertSinksResource
from resources.handles import current_materializations
from resources.pipeline import PipelineResource

RUN_TAG = "llm-assets/driver"


@dataclass(frozen=True)
class StepOutcome:
    asset: str
    partition: str | None
    sha256: str
    cache_hit: bool
    seconds: float


@dataclass(frozen=True)
class CheckProblem:
    """A check that did not pass: a failed evaluation (WARN or ERROR), or a check that raised."""

    asset: str
    partition: str | None
    check: str
    severity: str  # "WARN" | "ERROR"
    description: str
    run_id: str

    @property
    def label(self) -> str:
        return self.asset + (f"[{self.partition}]" if self.partition else "")

    def line(self) -> str:
        return f"{self.label} {self.check}: {self.description}"


@dataclass
class DriveResult:
    success: bool
    outcomes: list[StepOutcome]
    failed_runs: list[str]
    seconds: float
    check_problems: list[CheckProblem] = field(default_factory=list)
    # Sources that could not be listed and were skipped (on_source_error: skip): one line each.
    source_problems: list[str] = field(default_factory=list)

    @property
    def cache_hits(self) -> int:
        return sum(o.cache_hit for o in self.outcomes)


def check_summary(problems: Sequence[CheckProblem], full: bool = False) -> list[str]:
    """One line per check that did not pass: severity, asset[partition], check, first line of its
    description; `full` adds the description's further lines (e.g. every corrupt file), indented."""
    if not problems:
        return []
    label = max(len(p.label) for p in problems)
    check = max(len(p.check) for p in problems)
    lines = [f"{len(problems)} check(s) did not pass:"]
    for p in problems:
        first, *rest = p.description.strip().splitlines() or [""]
        lines.append(f"  {p.severity:<5}  {p.label:<{label}}  {p.check:<{check}}  {first}")
        lines.extend(f"      {line}" for line in rest if full)
    return lines


def _check_steps(defs: dg.Definitions) -> dict[str, list[dg.AssetCheckKey]]:
    """The checks each check step (op) evaluates."""
    return {c.node_def.name: list(c.check_keys) for c in defs.asset_checks or []}


def check_problems(
    result: dg.ExecuteInProcessResult, check_steps: Mapping[str, list[dg.AssetCheckKey]], partition: str | None
) -> list[CheckProblem]:
    """The checks of a run that did not pass: failed evaluations, and check steps that raised."""
    found = [
        CheckProblem(e.asset_key.to_user_string(), e.partition or partition, e.check_name, e.severity.value,
                     e.description or "", result.run_id)
        for e in result.get_asset_check_evaluations() if not e.passed
    ]
    for event in result.all_events:  # a check that raised instead of reporting
        error = event.event_specific_data.error if event.is_step_failure else None
        if error is None or error.cls_name == "DagsterAssetCheckFailedError" or event.step_key not in check_steps:
            continue
        keys = check_steps[event.step_key]
        found.append(CheckProblem(
            keys[0].asset_key.to_user_string() if keys else event.step_key, partition,
            ", ".join(k.name for k in keys) or event.step_key, "ERROR", f"raised: {error.message.strip()}",
            result.run_id,
        ))
    return found


def driver_tags(kind: str, alert_sinks: AlertSinksResource | None) -> dict[str, str]:
    return {RUN_TAG: kind, DRIVER_PROCESS_TAG: driver_process(),
            **({DRIVER_ALERTS_TAG: DRIVER_ALERTS} if alert_sinks is not None else {})}


@dataclass(frozen=True)
class ShardRegistration:
    new: list[str]  # partitions added
    problems: list[SourceProblem]  # sources that could not be listed (skipped: on_source_error: skip)
    skipped: set[str]  # existing partitions of those sources: they sit out this drive
    signatures: dict[str, str] = field(default_factory=dict)  # each listed shard's listing (files, sizes, versions)


def register_shards(
    defs: dg.Definitions, instance: dg.DagsterInstance, log: Callable[[str], None] = print
) -> ShardRegistration:
    """Add a corpus_shards partition for every shard the sources offer.

    A source that cannot be listed (a glob that matches nothing, a missing path) raises
    SourceListingError, one line per source, before anything is registered, under
    ``on_source_error: stop``; under ``skip`` it is logged and its partitions sit out the drive.
    Partitions that no source produces any more are named, with the command that removes them.
    """
    pipeline: PipelineResource = defs.resources["pipeline"]
    manifest = pipeline.load()
    found = discover_sources(manifest)
    if found.problems and manifest.on_source_error == "stop":
        raise SourceListingError(found.problems)
    existing = set(instance.get_dynamic_partitions(corpus_shards.name))
    new = list(dict.fromkeys(s.key for s in found.shards if s.key not in existing))
    if new:
        instance.add_dynamic_partitions(corpus_shards.name, new)
    for problem in found.problems:
        log(f"source skipped: {problem.message}")
    stale, unlisted = classify_partitions(manifest, found, existing)
    if stale:
        named = ", ".join(p.key for p in stale[:5]) + (", ..." if len(stale) > 5 else "")
        log(f"{len(stale)} corpus_shards partition(s) that no source produces any more ({named}): their runs "
            f"will fail; remove them with `{PRUNE_COMMAND}`")
    return ShardRegistration(new, found.problems, set(unlisted), {s.key: s.signature for s in found.shards})


def _family(node: dg.AssetsDefinition | object) -> str:
    partitions_def = getattr(node, "partitions_def", None)
    if partitions_def is None:
        return "unpartitioned"
    return getattr(partitions_def, "name", None) or repr(partitions_def)


def plan_waves(asset_graph, selected: set[dg.AssetKey]) -> list[list[dg.AssetKey]]:
    """Order the selected assets into waves; each wave shares one partitioning."""
    order = [k for k in asset_graph.toposorted_asset_keys if k in selected]
    done: set[dg.AssetKey] = set()
    waves = []
    while len(done) < len(order):
        wave: list[dg.AssetKey] = []
        family = None
        for key in order:
            if key in done:
                continue
            node = asset_graph.get(key)
            ready = all(p in done or p in wave or p not in selected for p in node.parent_keys)
            if not ready:
                continue
            if family is None:
                family = _family(node)
            if _family(node) == family:
                wave.append(key)
        done.update(wave)
        waves.append(wave)
    return waves


def _partition_keys(asset_graph, instance: dg.DagsterInstance, wave: Sequence[dg.AssetKey],
                    only: Sequence[str] | None = None) -> list[str | None]:
    """The wave's partitions; `only` narrows the waves whose partitioning has those keys."""
    partitions_def = asset_graph.get(wave[0]).partitions_def
    if partitions_def is None:
        return [None]
    keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    # A multi-dimensional key (model_size × scheme) is narrowed by any of its dimensions' keys.
    narrowed = [k for k in keys if k in (only or ())
                or isinstance(k, dg.MultiPartitionKey) and set(k.keys_by_dimension.values()) & set(only or ())]
    return narrowed or keys


def run_checks(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    asset_keys: Sequence[dg.AssetKey],
    partition: str | None = None,
    console_log_level: str = "WARNING",
    alert_sinks: AlertSinksResource | None = None,
) -> dg.ExecuteInProcessResult:
    """Run the checks of some assets, without materializing them, for one partition (or none);
    with `alert_sinks`, send the run's alerts.

    The partition goes in as the run's partition tag: Dagster's partition-key validation looks
    for a partitioned *asset* in the selection, and a check-only run has none.
    """
    result = dg.materialize(
        [*(defs.assets or []), *(defs.asset_checks or [])],
        selection=dg.AssetSelection.checks_for_assets(*asset_keys),
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
        tags={**driver_tags("verify", alert_sinks), **({"dagster/partition": partition} if partition else {})},
        run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}},
    )
    graph = defs.resolve_asset_graph()
    alert_unless_green(instance, result, [c for k in asset_keys for c in graph.get(k).check_keys], alert_sinks)
    return result


def alert_unless_green(
    instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult, check_keys: Sequence[dg.AssetCheckKey],
    alert_sinks: AlertSinksResource | None, log: Callable[[str], None] = print,
) -> None:
    """Send a finished run's alerts; a green run (every step succeeded, every check passed) has
    none, and costs no query."""
    if result.success and all(e.passed for e in result.get_asset_check_evaluations()):
        return
    send_run_alerts(instance, result.run_id, check_keys, alert_sinks, log)


def verify_checks(
    defs: dg.Definitions, instance: dg.DagsterInstance, alert_sinks: AlertSinksResource | None = None
) -> list[CheckProblem]:
    """Run every asset's checks on every partition that has a materialization; returns what did not pass."""
    asset_graph = defs.resolve_asset_graph()
    check_steps = _check_steps(defs)
    problems: list[CheckProblem] = []
    for key in asset_graph.toposorted_asset_keys:
        partitions = current_materializations(instance, key, asset_graph.get(key).partitions_def).keys()
        for partition in sorted(partitions, key=lambda p: p or ""):
            result = run_checks(defs, instance, [key], partition, console_log_level="CRITICAL",
                                alert_sinks=alert_sinks)
            problems.extend(check_problems(result, check_steps, partition))
    return problems


def verify_graph(
    defs: dg.Definitions, instance: dg.DagsterInstance, log: Callable[[str], None] = print
) -> list[str]:
    """`verify_checks`, each failure logged and returned as `asset[partition] check: description`."""
    failures = [p.line() for p in verify_checks(defs, instance)]
    for line in failures:
        log(f"FAILED {line}")
    return failures


def resolve_selection(asset_graph: BaseAssetGraph, selection: str | None) -> set[dg.AssetKey]:
    """The assets a drive materializes: those of `selection`, or by default the whole graph but the
    serving loop's time windows (`serving_traffic` and what reads it). Those fill from the
    server's logs under their sensor and automation conditions (`llm-assets automate`); a drive
    of the whole graph would otherwise run every window since the loop's start date."""
    if selection:
        return dg.AssetSelection.from_string(selection).resolve(asset_graph)
    windowed = [key for key in asset_graph.materializable_asset_keys
                if isinstance(asset_graph.get(key).partitions_def, dg.TimeWindowPartitionsDefinition)]
    return set(asset_graph.materializable_asset_keys) - dg.AssetSelection.assets(*windowed).downstream().resolve(
        asset_graph)


def materialize_graph(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: str | None = None,
    log: Callable[[str], None] = print,
    console_log_level: str = "WARNING",
    partitions: Sequence[str] | None = None,
    alert_sinks: AlertSinksResource | None = None,
    skip_unchanged: bool = True,
) -> DriveResult:
    """Materialize the selection (default: everything) wave by wave; `partitions` restricts the
    waves partitioned by those keys (e.g. one model size) to them. With `alert_sinks`, each run's
    alerts are sent as soon as it ends (and the alert sensor leaves that run alone).

    A wave partition whose every asset is unchanged since its last green run launches no run
    (`llm_assets.unchanged`): it is reported as a cache hit of what it holds. `skip_unchanged=False`
    launches every run (what a benchmark compares against), and records the green ones all the same."""
    started = time.perf_counter()
    asset_graph = defs.resolve_asset_graph()
    selected = resolve_selection(asset_graph, selection)
    shards = register_shards(defs, instance, log)
    new_shards = shards.new
    if new_shards:
        log(f"registered {len(new_shards)} new corpus shard(s)")
    assets = list(defs.assets or [])
    checks = list(defs.asset_checks or [])
    check_steps = _check_steps(defs)
    outcomes: list[StepOutcome] = []
    failed: list[str] = []
    problems: list[CheckProblem] = []
    # A drive launching every run records its green runs too: they are the current materializations
    # now, and a later drive finding none of them recorded would skip nothing.
    world = world_digest(defs, defs.resources["pipeline"].load(), shards.signatures)
    store, memo = defs.resources["artifact_store"].get_store(), DriveMemo()
    for wave in plan_waves(asset_graph, selected):
        names = ", ".join(k.to_user_string() for k in wave)
        keys = [k for k in _partition_keys(asset_graph, instance, wave, partitions) if k not in shards.skipped]
        unchanged = unchanged_partitions(instance, store, asset_graph, wave, keys, world, memo) \
            if skip_unchanged else {}
        outcomes.extend(StepOutcome(u.asset, u.partition, u.sha256, True, 0.0) for held in unchanged.values()
                        for u in held)
        keys = [k for k in keys if k not in unchanged]
        log(f"wave [{names}]: {len(keys)} run(s)" + (f", {len(unchanged)} unchanged" if unchanged else ""))
        for partition in keys:
            result = dg.materialize(
                [*assets, *checks],
                selection=dg.AssetSelection.assets(*wave),
                instance=instance,
                resources=defs.resources,
                partition_key=partition,
                raise_on_error=False,
                tags=driver_tags("materialize", alert_sinks),
                run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}},
            )
            run_problems = check_problems(result, check_steps, partition)
            problems.extend(run_problems)
            alert_unless_green(instance, result, [c for k in wave for c in asset_graph.get(k).check_keys],
                                alert_sinks, log)
            for event in result.get_asset_materialization_events():
                mat = event.step_materialization_data.materialization
                # Artifact assets describe themselves; any other asset is recorded as built.
                value = {k: v.value for k, v in mat.metadata.items()}
                outcomes.append(StepOutcome(
                    asset=mat.asset_key.to_user_string(),
                    partition=mat.partition,
                    sha256=str(value.get("sha256", "")),
                    cache_hit=bool(value.get("cache_hit", False)),
                    seconds=float(value.get("wall_seconds", 0.0)),
                ))
            # A WARN failure informs and holds nothing: the same artifacts would be judged the same.
            if result.success and all(p.severity == "WARN" for p in run_problems):
                record_green_run(instance, store, asset_graph, result, world)
            if not result.success:
                failed.append(result.run_id)
                log(f"  run {result.run_id} for {partition or 'all'} FAILED; see it in the UI")
        if failed:
            break
    # Skipped sources fail the drive too, once the healthy ones are done (the caller names them).
    return DriveResult(not failed and not shards.problems, outcomes, failed, time.perf_counter() - started, problems,
                       [p.message for p in shards.problems])
