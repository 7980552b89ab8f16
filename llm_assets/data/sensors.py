"""The landing sensor: every new (or changed) shard of a source becomes a partition and a run."""


import json
from dataclasses import dataclass, field

import dagster as dg

from llm_assets.data.clean_corpus import clean_corpus
from llm_assets.data.dedup_corpus import minhash_signatures
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.raw_corpus import raw_corpus
from llm_assets.data.sources import ShardSpec, SourceProblem, discover_sources, owning_sources
from llm_assets.manifest import PipelineManifest
from resources.pipeline import PipelineResource


@dataclass(frozen=True)
class Landing:
    new: list[ShardSpec]
    changed: list[ShardSpec]
    cursor: str
    problems: list[SourceProblem] = field(default_factory=list)  # sources that could not be listed


def landing_requests(manifest: PipelineManifest, existing: set[str], cursor: str | None) -> Landing:
    """New and changed shards, and the next cursor (shard key -> file signature). A source that
    cannot be listed is a problem, never an exception: the healthy sources are still listed, and
    the cursor keeps what it knew of the failing source's shards, so a source that comes back is
    compared with its files as they were."""
    seen: dict[str, str] = json.loads(cursor) if cursor else {}
    found = discover_sources(manifest)
    shards = found.shards
    new = [s for s in shards if s.key not in existing]
    changed = [s for s in shards if s.key in existing and seen.get(s.key) not in (None, s.signature)]
    failed = set(found.failed_sources)
    kept = {key: sig for key, sig in seen.items()
            if failed & {source.name for source in owning_sources(manifest, key)}}
    next_cursor = json.dumps({**kept, **{s.key: s.signature for s in shards}}, sort_keys=True)
    return Landing(new, changed, next_cursor, found.problems)


@dg.sensor(
    # The per-shard chain; the cross-shard steps (dedup_clusters onward) run once for all shards.
    asset_selection=[raw_corpus, clean_corpus, minhash_signatures],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a corpus_shards partition for every new shard of a source and runs its per-shard steps.",
)
def corpus_landing_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
    """A source that cannot be listed never crashes the sensor: it is logged on every tick, and under
    ``on_source_error: stop`` the tick is skipped (nothing requested, the cursor kept) naming it;
    under ``skip`` the other sources' shards are requested as usual."""
    manifest = pipeline.load()
    existing = set(context.instance.get_dynamic_partitions(corpus_shards.name))
    landing = landing_requests(manifest, existing, context.cursor)
    for problem in landing.problems:
        context.log.warning(problem.message)
    if landing.problems and manifest.on_source_error == "stop":
        return dg.SensorResult(
            skip_reason=f"{len(landing.problems)} source(s) cannot be listed (on_source_error: stop): "
                        + " | ".join(p.message for p in landing.problems),
            cursor=context.cursor,
        )
    new, changed = landing.new, landing.changed
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=s.key, run_key=f"{s.key}:{s.signature}") for s in new + changed],
        dynamic_partitions_requests=[corpus_shards.build_add_request([s.key for s in new])] if new else [],
        cursor=landing.cursor,
    )
