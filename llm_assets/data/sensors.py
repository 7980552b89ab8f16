"""The landing sensor: every new (or changed) shard of a source becomes a partition and a run."""


import json

import dagster as dg

from llm_assets.data.clean_corpus import clean_corpus
from llm_assets.data.dedup_corpus import minhash_signatures
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.raw_corpus import raw_corpus
from llm_assets.data.sources import ShardSpec, discover
from llm_assets.manifest import PipelineManifest
from resources.pipeline import PipelineResource


def landing_requests(
    manifest: PipelineManifest, existing: set[str], cursor: str | None
) -> tuple[list[ShardSpec], list[ShardSpec], str]:
    """(new shards, changed shards, next cursor); the cursor maps shard key to file signature."""
    seen: dict[str, str] = json.loads(cursor) if cursor else {}
    shards = discover(manifest)
    new = [s for s in shards if s.key not in existing]
    changed = [s for s in shards if s.key in existing and seen.get(s.key) not in (None, s.signature)]
    return new, changed, json.dumps({s.key: s.signature for s in shards}, sort_keys=True)


@dg.sensor(
    # The per-shard chain; the cross-shard steps (dedup_clusters onward) run once for all shards.
    asset_selection=[raw_corpus, clean_corpus, minhash_signatures],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a corpus_shards partition for every new shard of a source and runs its per-shard steps.",
)
def corpus_landing_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
    existing = set(context.instance.get_dynamic_partitions(corpus_shards.name))
    new, changed, cursor = landing_requests(pipeline.load(), existing, context.cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=s.key, run_key=f"{s.key}:{s.signature}") for s in new + changed],
        dynamic_partitions_requests=[corpus_shards.build_add_request([s.key for s in new])] if new else [],
        cursor=cursor,
    )
