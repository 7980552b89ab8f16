"""The release's batched read of its lineage's verdicts gives what one query per check gives."""

from __future__ import annotations

import dagster as dg

from llm_assets.checks.results import check_verdicts
from llm_assets.release.assets import lineage_verdicts
from llm_assets.runner import materialize_graph, run_checks
from llm_assets.store import open_store
from llm_assets_tests.store.test_store import flip_byte
from resources.handles import current_materializations


def test_lineage_verdicts_match_the_per_check_reads_passed_failed_and_stale(defs, instance, settings):
    assert materialize_graph(defs, instance, selection="key:raw_corpus+", log=lambda _: None).success
    graph = defs.resolve_asset_graph()
    rows = [(key, part) for key in (dg.AssetKey("raw_corpus"), dg.AssetKey("corpus_inventory"))
            for part in sorted(current_materializations(instance, key, graph.get(key).partitions_def),
                               key=lambda p: p or "")]
    # A failed verdict (a corrupt shard, judged by a checks-only run) among passed ones.
    store, shard = open_store(settings.store_uri), rows[0][1]
    sha = current_materializations(instance, dg.AssetKey("raw_corpus"), None)[shard].metadata["sha256"].value
    flip_byte(store, sha, "shard.parquet", offset=100)
    run_checks(defs, instance, [dg.AssetKey("raw_corpus")], shard, console_log_level="CRITICAL")

    expected = [v for key, part in rows for v in check_verdicts(instance, graph, key, part)]
    assert lineage_verdicts(instance, graph, rows) == expected
    assert {v.status for v in expected} == {"passed", "failed"}
