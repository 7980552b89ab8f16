"""Hash gates: a flipped byte or a stale input stops everything downstream, and says where."""

from __future__ import annotations

import dagster as dg
import yaml

from llm_assets.checks import INPUT_CHAIN, INTEGRITY
from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph, run_checks, verify_graph
from llm_assets.store import open_store
from llm_assets_tests.store.test_store import flip_byte

RAW = dg.AssetKey("raw_corpus")
INVENTORY = dg.AssetKey("corpus_inventory")


# The generic machinery needs only the first chain; tests of the whole graph live elsewhere.
CHAIN = "key:raw_corpus or key:corpus_inventory"


def quiet(_: str) -> None:
    pass


def current_sha(instance, key, partition=None) -> str:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].asset_materialization.metadata["sha256"].value


def evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()
    }


def test_clean_partitions_pass_next_to_a_corrupt_one(defs, instance, settings):
    assert materialize_graph(defs, instance, selection=CHAIN, log=quiet).success
    bad, good = instance.get_dynamic_partitions("corpus_shards")[:2]
    flip_byte(open_store(settings.store_uri), current_sha(instance, RAW, bad), "shard.parquet", offset=99)
    verdicts = {
        shard: evaluations(run_checks(defs, instance, [RAW], shard))[("raw_corpus", INTEGRITY)].passed
        for shard in (bad, good)
    }
    assert verdicts == {bad: False, good: True}
    failures = verify_graph(defs, instance, log=quiet)
    assert failures and all(f.startswith(f"raw_corpus[{bad}] ") for f in failures)
    assert any(f"raw_corpus[{bad}] {INTEGRITY}: " in f and "shard.parquet: sha256" in f for f in failures)


def test_every_asset_gets_generated_hash_gates(defs):
    keys = defs.resolve_asset_graph().asset_check_keys
    assert dg.AssetCheckKey(RAW, INTEGRITY) in keys
    assert dg.AssetCheckKey(INVENTORY, INTEGRITY) in keys
    assert dg.AssetCheckKey(INVENTORY, INPUT_CHAIN) in keys
    assert dg.AssetCheckKey(RAW, INPUT_CHAIN) not in keys, "a source asset has no parents to chain"
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        assert dg.AssetCheckKey(key, INTEGRITY) in keys, key
        assert (dg.AssetCheckKey(key, INPUT_CHAIN) in keys) == bool(graph.get(key).parent_keys), key
    for check in defs.asset_checks:
        for spec in check.check_specs:
            if spec.name in (INTEGRITY, INPUT_CHAIN):
                assert spec.blocking, f"{spec.key} must block downstream steps"
                assert spec.partitions_def == graph.get(spec.asset_key).partitions_def


def test_gates_pass_on_a_clean_drive(defs, instance):
    assert materialize_graph(defs, instance, selection=CHAIN, log=quiet).success
    statuses = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(defs.resolve_asset_graph().asset_check_keys)
    )
    assert {r.status.value for r in statuses.values()} == {"SUCCEEDED"}


def test_flipped_byte_fails_integrity_names_the_file_and_blocks_downstream(defs, instance, settings):
    assert materialize_graph(defs, instance, selection=CHAIN, log=quiet).success
    shard = instance.get_dynamic_partitions("corpus_shards")[1]
    sha = current_sha(instance, RAW, shard)
    flip_byte(open_store(settings.store_uri), sha, "shard.parquet", offset=200)
    inventory_before = current_sha(instance, INVENTORY)
    runs_before = len(instance.get_runs())

    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.checks_for_assets(RAW) | dg.AssetSelection.assets(INVENTORY),
        tags={"dagster/partition": shard},  # see run_checks: no partitioned asset is selected
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
    )
    assert not result.success
    failed = evaluations(result)[("raw_corpus", INTEGRITY)]
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    assert f"raw_corpus[{shard}]" in failed.description and "shard.parquet: sha256" in failed.description
    assert failed.metadata["failures"].value == 1 and failed.partition == shard
    assert result.asset_materializations_for_node("corpus_inventory") == [], "downstream was skipped"
    assert current_sha(instance, INVENTORY) == inventory_before
    assert len(instance.get_runs()) == runs_before + 1


def test_corrupt_cached_artifact_is_rebuilt_not_reused(defs, instance, settings):
    assert materialize_graph(defs, instance, selection=CHAIN, log=quiet).success
    shard = instance.get_dynamic_partitions("corpus_shards")[0]
    sha = current_sha(instance, RAW, shard)
    store = open_store(settings.store_uri)
    flip_byte(store, sha, "shard.parquet", offset=50)

    result = dg.materialize(
        [*defs.assets, *defs.asset_checks], selection=[RAW], partition_key=shard,
        instance=instance, resources=defs.resources,
    )
    mat = result.asset_materializations_for_node("raw_corpus")[0]
    assert mat.metadata["cache_hit"].value is False
    assert mat.metadata["sha256"].value == sha, "rebuilt from the same source: the same content"
    assert store.verify(sha).ok, "the corrupt copy was replaced"
    assert evaluations(result)[("raw_corpus", INTEGRITY)].passed


def test_stale_input_fails_the_input_chain_and_names_the_parent(defs, instance, manifest_path, settings):
    assert materialize_graph(defs, instance, selection=CHAIN, log=quiet).success
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"][0]["min_docstring_chars"] = 40
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)  # the Definitions follow the manifest they were built from
    assert materialize_graph(defs, instance, selection="key:raw_corpus", log=quiet).success

    stale = run_checks(defs, instance, [INVENTORY])
    evaluation = evaluations(stale)[("corpus_inventory", INPUT_CHAIN)]
    assert not evaluation.passed
    assert "consumed raw_corpus[stdlib-0000]" in evaluation.description
    assert "rematerialize corpus_inventory" in evaluation.description
    # The two gates share a step; one of them runs alone (the UI's "execute" on one check).
    alone = dg.materialize([*defs.assets, *defs.asset_checks], instance=instance, resources=defs.resources,
                           selection=dg.AssetSelection.checks(dg.AssetCheckKey(INVENTORY, INPUT_CHAIN)),
                           raise_on_error=False)
    assert list(evaluations(alone)) == [("corpus_inventory", INPUT_CHAIN)]
    assert not evaluations(alone)[("corpus_inventory", INPUT_CHAIN)].passed

    assert materialize_graph(defs, instance, selection="key:corpus_inventory", log=quiet).success
    fresh = run_checks(defs, instance, [INVENTORY])
    assert evaluations(fresh)[("corpus_inventory", INPUT_CHAIN)].passed


def test_check_on_an_unmaterialized_asset_fails(defs, instance):
    evaluation = evaluations(run_checks(defs, instance, [INVENTORY]))[("corpus_inventory", INTEGRITY)]
    assert not evaluation.passed and "no materialization" in evaluation.description
