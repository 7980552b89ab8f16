"""Materialize the asset graph in-process on one Dagster instance: the embedded default's driver.

In production the daemon, sensors and backfills launch runs. On a laptop this driver does the
same work in order: it registers the corpus shards the landing sensor would find, then runs
waves of assets that share a partitioning, one run per partition, with every check attached.
A wave that fails stops the drive: its downstream would be blocked anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg

from llm_assets.data.partitions import corpus_shards
from llm_assets.data.sensors import landing_requests
from resources.handles import latest_materializations
from resources.pipeline import PipelineResource

RUN_TAG = "llm-assets/driver"


@dataclass(frozen=True)
class StepOutcome:
    asset: str
    partition: str | None
    sha256: str
    cache_hit: bool
    seconds: float


@dataclass
class DriveResult:
    success: bool
    outcomes: list[StepOutcome]
    failed_runs: list[str]
    seconds: float

    @property
    def cache_hits(self) -> int:
        return sum(o.cache_hit for o in self.outcomes)


def register_shards(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Add a corpus_shards partition for every shard the sources offer; returns the new keys."""
    pipeline: PipelineResource = defs.resources["pipeline"]
    existing = set(instance.get_dynamic_partitions(corpus_shards.name))
    new, _, _ = landing_requests(pipeline.load(), existing, None)
    if new:
        instance.add_dynamic_partitions(corpus_shards.name, [s.key for s in new])
    return [s.key for s in new]


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
) -> dg.ExecuteInProcessResult:
    """Run the checks of some assets, without materializing them, for one partition (or none).

    The partition goes in as the run's partition tag: Dagster's partition-key validation looks
    for a partitioned *asset* in the selection, and a check-only run has none.
    """
    return dg.materialize(
        [*(defs.assets or []), *(defs.asset_checks or [])],
        selection=dg.AssetSelection.checks_for_assets(*asset_keys),
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
        tags={RUN_TAG: "verify", **({"dagster/partition": partition} if partition else {})},
        run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}},
    )


def verify_graph(
    defs: dg.Definitions, instance: dg.DagsterInstance, log: Callable[[str], None] = print
) -> list[str]:
    """Run every asset's checks on every partition that has a materialization; returns failures."""
    asset_graph = defs.resolve_asset_graph()
    failures: list[str] = []
    for key in asset_graph.toposorted_asset_keys:
        partitions = latest_materializations(instance, key).keys()
        for partition in sorted(partitions, key=lambda p: p or ""):
            label = key.to_user_string() + (f"[{partition}]" if partition else "")
            result = run_checks(defs, instance, [key], partition, console_log_level="CRITICAL")
            found = [
                f"{label} {e.check_name}: {e.description}"
                for e in result.get_asset_check_evaluations() if not e.passed
            ]
            found += [  # a check that raised instead of reporting
                f"{label} {event.step_key}: {event.event_specific_data.error.message.strip()}"
                for event in result.all_events
                if event.is_step_failure and event.event_specific_data.error
                and event.event_specific_data.error.cls_name != "DagsterAssetCheckFailedError"
            ]
            for line in found:
                log(f"FAILED {line}")
            failures.extend(found)
    return failures


def materialize_graph(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: str | None = None,
    log: Callable[[str], None] = print,
    console_log_level: str = "WARNING",
    partitions: Sequence[str] | None = None,
) -> DriveResult:
    """Materialize the selection (default: everything) wave by wave; `partitions` restricts the
    waves partitioned by those keys (e.g. one model size) to them."""
    started = time.perf_counter()
    asset_graph = defs.resolve_asset_graph()
    selected = (
        dg.AssetSelection.from_string(selection).resolve(asset_graph)
        if selection else set(asset_graph.materializable_asset_keys)
    )
    new_shards = register_shards(defs, instance)
    if new_shards:
        log(f"registered {len(new_shards)} new corpus shard(s)")
    assets = list(defs.assets or [])
    checks = list(defs.asset_checks or [])
    outcomes: list[StepOutcome] = []
    failed: list[str] = []
    for wave in plan_waves(asset_graph, selected):
        names = ", ".join(k.to_user_string() for k in wave)
        keys = _partition_keys(asset_graph, instance, wave, partitions)
        log(f"wave [{names}]: {len(keys)} run(s)")
        for partition in keys:
            result = dg.materialize(
                [*assets, *checks],
                selection=dg.AssetSelection.assets(*wave),
                instance=instance,
                resources=defs.resources,
                partition_key=partition,
                raise_on_error=False,
                tags={RUN_TAG: "materialize"},
                run_config={"loggers": {"console": {"config": {"log_level": console_log_level}}}},
            )
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
            if not result.success:
                failed.append(result.run_id)
                log(f"  run {result.run_id} for {partition or 'all'} FAILED; see it in the UI")
        if failed:
            break
    return DriveResult(not failed, outcomes, failed, time.perf_counter() - started)
