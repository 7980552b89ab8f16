"""The machinery end to end on a real Dagster instance: handles, metadata, early cutoff."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml

from llm_assets.artifacts import _progress_logger
from llm_assets.definitions import build_definitions
from llm_assets.manifest import ManifestError
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store

RAW = dg.AssetKey("raw_corpus")
INVENTORY = dg.AssetKey("corpus_inventory")


# The generic machinery needs only the first chain; tests of the whole graph live elsewhere.
CHAIN = "key:raw_corpus or key:corpus_inventory"


def quiet(_: str) -> None:
    pass


def test_first_drive_materializes_everything_with_full_metadata(defs, instance, settings):
    result = materialize_graph(defs, instance, log=quiet)
    assert result.success
    shards = instance.get_dynamic_partitions("corpus_shards")
    assert len(shards) >= 3
    assert not any(o.cache_hit for o in result.outcomes)
    assert {o.asset for o in result.outcomes} == {
        k.to_user_string() for k in defs.resolve_asset_graph().materializable_asset_keys
    }

    event = instance.get_latest_materialization_event(INVENTORY)
    mat = event.asset_materialization
    meta = mat.metadata
    for key in ("uri", "sha256", "bytes", "input_hashes", "fingerprint", "wall_seconds", "cache_hit", "code_version"):
        assert key in meta, key
    sha = meta["sha256"].value
    assert mat.tags["dagster/data_version"] == sha, "the data version is the artifact hash"
    store = open_store(settings.store_uri)
    assert store.verify(sha).ok
    consumed = meta["input_hashes"].value
    assert sorted(r["partition"] for r in consumed) == sorted(shards)
    raw_current = {
        p: instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RAW, asset_partitions=[p]), limit=1
        ).records[0].asset_materialization.metadata["sha256"].value
        for p in shards
    }
    assert {r["partition"]: r["sha256"] for r in consumed} == raw_current
    assert meta["shards"].value == len(shards) and meta["documents"].value > 100


def test_second_drive_is_all_cache_hits_with_identical_hashes(defs, instance):
    first = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    second = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    assert second.success and second.cache_hits == len(second.outcomes) == len(first.outcomes)
    assert {(o.asset, o.partition, o.sha256) for o in first.outcomes} == {
        (o.asset, o.partition, o.sha256) for o in second.outcomes
    }


def test_recomputing_identical_output_cuts_off_downstream(defs, instance, settings):
    """Forget raw_corpus's cache: it is rebuilt, its bytes are identical, so inventory is a hit."""
    first = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    shutil.rmtree(f"{settings.store_uri}/index/raw_corpus")
    second = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    raw = [o for o in second.outcomes if o.asset == "raw_corpus"]
    inventory = [o for o in second.outcomes if o.asset == "corpus_inventory"]
    assert raw and not any(o.cache_hit for o in raw), "raw shards were really recomputed"
    assert {o.sha256 for o in raw} == {o.sha256 for o in first.outcomes if o.asset == "raw_corpus"}
    assert inventory[0].cache_hit


def test_a_recipe_change_recomputes_and_changes_hashes(defs, instance, manifest_path, settings):
    first = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"][0]["min_docstring_chars"] = 50
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)  # the Definitions follow the manifest they were built from
    second = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    assert second.success and second.cache_hits == 0
    before = {(o.asset, o.partition): o.sha256 for o in first.outcomes}
    after = {(o.asset, o.partition): o.sha256 for o in second.outcomes}
    assert before.keys() == after.keys()
    assert all(before[k] != after[k] for k in before), "more docstrings kept: every artifact changes"


def test_selection_rematerializes_one_shard_only(defs, instance):
    materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    shard = instance.get_dynamic_partitions("corpus_shards")[0]
    assets = [*defs.assets, *defs.asset_checks]
    result = dg.materialize(assets, selection=[RAW], partition_key=shard, instance=instance, resources=defs.resources)
    mats = result.asset_materializations_for_node("raw_corpus")
    assert [m.partition for m in mats] == [shard]
    assert mats[0].metadata["cache_hit"].value is True


def test_the_graph_runs_on_an_s3_store(settings, instance, s3_client, s3_bucket, seaweedfs, tmp_path):
    """The same assets against a real S3 server, through dagster-aws's S3Resource."""
    from dataclasses import replace


    s3_settings = replace(settings, store_uri=f"s3://{s3_bucket}/lifecycle", s3_endpoint_url=seaweedfs)
    defs = build_definitions(s3_settings)
    first = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    assert first.success
    mat = instance.get_latest_materialization_event(INVENTORY).asset_materialization
    assert mat.metadata["uri"].value.startswith(f"s3://{s3_bucket}/lifecycle/objects/")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="lifecycle/")["Contents"]]
    assert any(k.endswith("/MANIFEST.json") for k in keys) and any("/index/" in k for k in keys)
    second = materialize_graph(defs, instance, selection=CHAIN, log=quiet)
    assert second.cache_hits == len(second.outcomes)


def test_every_asset_has_an_owner_a_stage_and_a_compute_tag(settings, tmp_path):
    """Every asset of the whole default graph (pipeline.yaml: every stage configured) is owned by
    a team and tagged with its lifecycle stage and whether its step asks for a GPU."""
    from dataclasses import replace

    from llm_assets.artifacts import STAGES
    from llm_assets.settings import PROJECT_ROOT

    graph = build_definitions(replace(settings, manifest=str(PROJECT_ROOT / "pipeline.yaml"))).resolve_asset_graph()
    nodes = list(graph.asset_nodes)
    assert nodes
    tag_value = r"^[A-Za-z0-9_.-]{1,63}$"
    for node in nodes:
        name = node.key.to_user_string()
        assert node.owners and all(o.startswith("team:") for o in node.owners), name
        assert node.tags.get("stage") in STAGES and node.tags["stage"] == node.group_name, name
        assert node.tags.get("compute") in ("cpu", "gpu"), name
        assert all(re.match(tag_value, node.tags[k]) for k in ("stage", "compute")), name
    stages = {n.key.to_user_string(): n.tags["stage"] for n in nodes}
    compute = {n.key.to_user_string(): n.tags["compute"] for n in nodes}
    assert set(stages.values()) == set(STAGES), "the default graph has every stage"
    # GPUs are asked for by the training, evaluation and quantization steps (compute.training).
    assert {a for a, c in compute.items() if c == "gpu"} == {
        "pretrain_checkpoint", "sft_model", "reward_model", "policy", "eval_report", "quantized_model",
        "feedback_model", "feedback_eval_report"}


def test_a_run_refuses_a_manifest_changed_since_the_definitions_were_built(defs, instance, manifest_path):
    manifest_path.write_text(manifest_path.read_text() + "# edited after the Definitions were built\n")
    with pytest.raises(ManifestError, match="changed after the Definitions were built from it.*Reload the code"):
        materialize_graph(defs, instance, selection="key:raw_corpus", log=quiet)


def test_the_write_of_a_large_artifact_is_logged_every_tenth_and_a_small_one_not_at_all() -> None:
    logged: list[str] = []
    context = SimpleNamespace(log=SimpleNamespace(info=logged.append))
    mb = 2**20
    small = _progress_logger(context, "tokenizer")
    for done in (1 * mb, 2 * mb):
        small("part", done, 2 * mb)
    assert logged == []

    large = _progress_logger(context, "pretrain_checkpoint")
    for n in range(1, 41):  # 40 files of 5 MB
        large(f"shard-{n}", n * 5 * mb, 200 * mb)
    assert len(logged) == 10 and logged[-1] == "pretrain_checkpoint: stored 209.7/209.7 MB (shard-40)"
