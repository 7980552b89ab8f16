"""The landing sensor turns new and changed shards into partitions and run requests."""

from __future__ import annotations

import dagster as dg
import yaml

from llm_assets.data.sensors import corpus_landing_sensor
from llm_assets.data.sources import discover
from llm_assets.definitions import build_definitions
from llm_assets.manifest import load_manifest


def tick(defs, instance, cursor):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources={"pipeline": defs.resources["pipeline"]}
    )
    return corpus_landing_sensor(context)


def test_new_shards_become_partitions_with_a_run_each(defs, instance, manifest_path):
    expected = [s.key for s in discover(load_manifest(manifest_path))]
    result = tick(defs, instance, None)
    assert [r.partition_key for r in result.run_requests] == expected
    assert result.dynamic_partitions_requests[0].partition_keys == expected
    instance.add_dynamic_partitions("corpus_shards", expected)

    again = tick(defs, instance, result.cursor)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []


def test_a_changed_source_requests_its_shards_again(defs, instance, manifest_path, settings):
    first = tick(defs, instance, None)
    instance.add_dynamic_partitions("corpus_shards", [r.partition_key for r in first.run_requests])
    # Same shard keys, different files behind them: a changed signature.
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"][0]["include"] = ["email/*"]
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)  # the Definitions follow the manifest they were built from
    second = tick(defs, instance, first.cursor)
    changed = {r.partition_key for r in second.run_requests}
    assert changed, "re-cut shards are requested again"
    assert all(r.run_key not in {f.run_key for f in first.run_requests} for r in second.run_requests)


def test_a_source_that_cannot_be_listed_never_crashes_the_sensor(defs, instance, manifest_path, settings):
    """stop: the tick is skipped naming the source, the cursor kept; skip: the other sources go on."""
    manifest = yaml.safe_load(manifest_path.read_text())
    healthy = [s.key for s in discover(load_manifest(manifest_path))]
    first = tick(defs, instance, None)
    manifest["sources"].append({"kind": "local", "name": "web", "paths": ["crawl/*.jsonl"]})
    manifest_path.write_text(yaml.safe_dump(manifest))
    stopped = tick(build_definitions(settings), instance, first.cursor)
    assert stopped.run_requests == [] and stopped.dynamic_partitions_requests == []
    assert stopped.cursor == first.cursor
    message = stopped.skip_reason.skip_message
    assert "1 source(s) cannot be listed (on_source_error: stop)" in message
    assert f"{manifest_path}:" in message and "source 'web'" in message and "crawl/*.jsonl' matches no files" in message

    manifest_path.write_text(yaml.safe_dump({**manifest, "on_source_error": "skip"}))
    skipped = tick(build_definitions(settings), instance, None)
    assert [r.partition_key for r in skipped.run_requests] == healthy
    assert skipped.dynamic_partitions_requests[0].partition_keys == healthy
