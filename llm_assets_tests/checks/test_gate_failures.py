"""Each gate fails on realistic bad input, through its real check on a real Dagster instance.

Where the real upstream is slow (a trained tokenizer, a pretraining sweep, a release) or cannot
produce the bad input (dedup removes what `no_duplicates_across_splits` looks for), a stand-in
asset with the real asset's key stores the bad artifact through `materialize_artifact`, the one
path every real asset takes, and the real check judges it. A blocking check's failure must also
hold the asset after it in the same run; a warning must not. docs/gates.md lists every gate and
the test that shows it failing.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
import yaml
from tokenizers import normalizers
from transformers import LlamaConfig, LlamaForCausalLM

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.data.dataset_splits import dataset_splits, no_duplicates_across_splits
from llm_assets.data.partitions import corpus_shards
from llm_assets.data.raw_corpus import SHARD_FILE, raw_schema_and_content
from llm_assets.definitions import build_definitions, build_resources
from llm_assets.hf_models import save_hf
from llm_assets.manifest import ServingRecipe, TokenizerRecipe, load_manifest
from llm_assets.pretrain.assets import build_defs as pretrain_defs
from llm_assets.runner import materialize_graph
from llm_assets.serving.assets import SPEC_FILE
from llm_assets.serving.assets import build_defs as serving_build_defs
from llm_assets.serving.spec import render_manifests, spec_document
from llm_assets.store import open_store
from llm_assets.tokenizer.assets import TOKENIZER_FILE, token_shards_valid, tokenizer_round_trip
from llm_assets.tokenizer.bpe import save_hf_tokenizer, train_bpe
from llm_assets.tokenizer.packing import META_FILE, TOKENS_FILE, pack_documents
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.pretrain.test_assets import TINY, with_training
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

SHARDS = ["web-a.jsonl", "web-b.jsonl"]
PYTHON_TEXT = "\n".join(
    f"def handler_{i}(request, timeout={i}):\n    return request.send(timeout=timeout)  # retries {i} times"
    for i in range(60)
)


def stand_in(name: str, group: str, write: Callable[[Path], dict[str, Any] | None], *,
             partitions_def: dg.PartitionsDefinition | None = None,
             inputs: dict[str, ArtifactHandle] | None = None) -> dg.AssetsDefinition:
    """An asset with the real asset's key whose artifact is what `write` puts in the build folder,
    stored and reported as every real asset's is (materialize_artifact)."""

    @artifact_asset(name=name, partitions_def=partitions_def, group_name=group,
                    description=f"stands in for the real {name} with a bad artifact")
    def asset(context: dg.AssetExecutionContext, pipeline: PipelineResource,
              artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        return materialize_artifact(context, artifact_store.get_store(), kind=name, config={"stand_in": name},
                                    inputs=inputs, build=write)

    return asset


def next_asset(upstream: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """Stands in for whatever the graph builds from `upstream` (same partitions)."""

    @dg.asset(name=f"after_{upstream.key.to_python_identifier()}", deps=[upstream.key],
              partitions_def=upstream.partitions_def)
    def after() -> None:
        return None

    return after


def stage_asset(defs: dg.Definitions, name: str) -> dg.AssetsDefinition:
    """The asset as a stage's build_defs made it (not yet bound to the project's resources)."""
    [asset] = [a for a in defs.assets or [] if dg.AssetKey(name) in a.keys]
    return asset


def stage_check(defs: dg.Definitions, name: str) -> dg.AssetChecksDefinition:
    [check] = [c for c in defs.asset_checks or [] if any(k.name == name for k in c.check_keys)]
    return check


def run(assets: Sequence[dg.AssetsDefinition], checks: Sequence[dg.AssetChecksDefinition], resources: dict,
        instance: dg.DagsterInstance, *, partition: str | None = None,
        selection: Sequence[dg.AssetKey] | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize([*assets, *checks], selection=selection, partition_key=partition, instance=instance,
                          resources=resources, raise_on_error=False)


def verdict(result: dg.ExecuteInProcessResult, check: str) -> dg.AssetCheckEvaluation:
    found = [e for e in result.get_asset_check_evaluations() if e.check_name == check]
    if not found:
        failures = [e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure]
        pytest.fail(f"{check} did not judge: {failures}")
    return found[-1]


def materialized(result: dg.ExecuteInProcessResult, asset: dg.AssetsDefinition) -> bool:
    return asset.key in {e.asset_key for e in result.get_asset_materialization_events()}


def write_manifest(manifest_path: Path, **changes: Any) -> dict:
    manifest = {**yaml.safe_load(manifest_path.read_text()), **changes}
    manifest_path.write_text(yaml.safe_dump(manifest))
    return manifest


def shard_frame(source_file: str, texts: list[str]) -> pl.DataFrame:
    """A corpus shard as raw_corpus writes it: id, text, source, uri, kind, sha256."""
    uris = [f"file:///corpus/{source_file}#{i}" for i in range(len(texts))]
    return pl.DataFrame({
        "id": [hashlib.sha256(uri.encode()).hexdigest()[:16] for uri in uris], "text": texts,
        "source": ["web"] * len(texts), "uri": uris, "kind": ["text"] * len(texts),
        "sha256": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
    })


def test_a_shard_from_an_older_ingester_fails_raw_schema_and_content_and_holds_cleaning(settings, instance):
    """A shard written before raw_corpus had its `kind` column (an ingester of an earlier
    version, or a connector that writes its own parquet): the schema gate is blocking."""
    instance.add_dynamic_partitions(corpus_shards.name, SHARDS[:1])

    def write(out: Path) -> dict:
        shard_frame(SHARDS[0], ["An old page of prose."]).drop("kind").write_parquet(out / SHARD_FILE)
        return {"documents": 1, "decode_errors": 0}

    raw_corpus = stand_in("raw_corpus", "data", write, partitions_def=corpus_shards)
    clean_corpus = next_asset(raw_corpus)
    result = run([raw_corpus, clean_corpus], [raw_schema_and_content], build_resources(settings), instance,
                 partition=SHARDS[0])
    gate = verdict(result, "raw_schema_and_content")
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.ERROR
    assert f"raw_corpus[{SHARDS[0]}]: schema ['id', 'text', 'source', 'uri', 'sha256'] is not" in gate.description
    assert materialized(result, raw_corpus) and not materialized(result, clean_corpus)


def test_a_document_in_two_shards_fails_no_duplicates_across_splits_and_holds_the_tokenizer(settings, instance):
    """A dedup that ran per shard (not across the corpus) leaves a page copied into a second
    source file in both shards: the real dataset_splits splits them by document, and the check
    finds the same text twice. The real graph's corpus-wide dedup removes exact copies first, so
    only a stand-in dedup_corpus can feed the gate this input."""
    rng = random.Random(3)
    texts = {shard: [" ".join(f"w{rng.randrange(5000)}" for _ in range(60)) + "." for _ in range(12)]
             for shard in SHARDS}
    texts[SHARDS[1]][5] = texts[SHARDS[0]][7]  # the same page, landed in both files
    instance.add_dynamic_partitions(corpus_shards.name, SHARDS)

    @artifact_asset(name="dedup_corpus", partitions_def=corpus_shards, group_name="data",
                    description="stands in for a dedup_corpus deduplicated shard by shard")
    def dedup_corpus(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                     artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        frame = shard_frame(context.partition_key, texts[context.partition_key])
        return materialize_artifact(context, artifact_store.get_store(), kind="parquet_shard",
                                    config={"stand_in": "dedup_corpus"},
                                    build=lambda out: frame.write_parquet(out / SHARD_FILE))

    tokenizer = next_asset(dataset_splits)
    resources = build_resources(settings)
    assets = [dedup_corpus, dataset_splits, tokenizer]
    for shard in SHARDS:
        assert run(assets, [], resources, instance, partition=shard, selection=[dedup_corpus.key]).success
    result = run(assets, [no_duplicates_across_splits], resources, instance,
                 selection=[dataset_splits.key, tokenizer.key])
    gate = verdict(result, "no_duplicates_across_splits")
    assert not gate.passed and gate.metadata["duplicate_texts"].value == 2
    assert "0 rows share an id, 2 share a text" in gate.description
    assert materialized(result, dataset_splits) and not materialized(result, tokenizer)


def test_a_tokenizer_that_folds_ligatures_fails_the_round_trip_and_holds_token_shards(settings, instance, tmp_path):
    """A BPE tokenizer with an NFKC normalizer (as many hub tokenizers carry), on a corpus cleaned
    with unicode_form NFC, where ligatures and fullwidth letters survive: decode(encode(text))
    gives 'fi' for 'ﬁ' and 'A' for 'Ａ'."""
    recipe = TokenizerRecipe(vocab_size=300)
    held_out = shard_frame("notes.txt", ["The ﬁrst ﬂoor of building Ａ is closed.", "Plain ASCII survives."])
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    held_out.write_parquet(splits_dir / "val.parquet")
    store = open_store(settings.store_uri)
    splits = store.put_dir(splits_dir)
    splits_handle = ArtifactHandle("dataset_splits", None, "dataset_splits", splits.sha256, splits.uri, splits.bytes)

    def write_tokenizer(out: Path) -> None:
        trained = train_bpe([PYTHON_TEXT], recipe)
        trained.normalizer = normalizers.NFKC()
        save_hf_tokenizer(trained, recipe, out)

    tokenizer = stand_in("tokenizer", "tokenizer", write_tokenizer, inputs={"dataset_splits": splits_handle})
    token_shards = next_asset(tokenizer)
    result = run([tokenizer, token_shards], [tokenizer_round_trip], build_resources(settings), instance)
    gate = verdict(result, "tokenizer_round_trip")
    first_id = held_out["id"][0]
    assert not gate.passed and f"{first_id}: decode(encode(text)) differs from character 4" in gate.description
    assert gate.metadata["failures"].value == 1  # the ASCII document round-trips
    assert materialized(result, tokenizer) and not materialized(result, token_shards)


def _packed_with_a_larger_tokenizer(out: Path) -> None:
    """A shard encoded with a retrained 1024-token tokenizer, while its meta.json still records the
    graph's 300-token one: ids past the embedding table of the model that reads it."""
    larger = train_bpe([PYTHON_TEXT], TokenizerRecipe(vocab_size=1024, min_frequency=1))
    pack_documents(larger, PYTHON_TEXT.split("\n"), out, eos_id=0, batch_size=16)
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "vocab_size": 300}))


def _packed_then_cut_short(out: Path) -> None:
    """A packer killed mid-write: tokens.bin ends inside the last documents, meta.json says more."""
    tokenizer = train_bpe([PYTHON_TEXT], TokenizerRecipe(vocab_size=300))
    pack_documents(tokenizer, PYTHON_TEXT.split("\n"), out, eos_id=0, batch_size=16)
    data = (out / TOKENS_FILE).read_bytes()
    (out / TOKENS_FILE).write_bytes(data[: len(data) - 10])


@pytest.mark.parametrize("write, problem", [
    (_packed_with_a_larger_tokenizer, "is not below the vocabulary size 300"),
    (_packed_then_cut_short, "meta says"),
], ids=["ids-past-the-vocabulary", "cut-short"])
def test_a_bad_token_shard_fails_token_ids_valid_and_holds_pretraining(settings, instance, write, problem):
    instance.add_dynamic_partitions(corpus_shards.name, SHARDS[:1])
    token_shards = stand_in("token_shards", "tokenizer", write, partitions_def=corpus_shards)
    pretrain = next_asset(token_shards)
    result = run([token_shards, pretrain], [token_shards_valid], build_resources(settings), instance,
                 partition=SHARDS[0])
    gate = verdict(result, "token_ids_valid")
    assert not gate.passed and problem in gate.description and f"token_shards[{SHARDS[0]}]" in gate.description
    assert materialized(result, token_shards) and not materialized(result, pretrain)


def test_a_recipe_that_drops_nine_documents_in_ten_warns_and_holds_nothing(settings, manifest_path, instance, tmp_path):
    """min_chars raised to 2000 on a shard of ordinary web pages: one page in ten is that long.
    The check warns (and alerts); it is not blocking, so dedup still runs on what is left."""
    rng = random.Random(11)
    folder = tmp_path / "corpus"
    folder.mkdir()
    pages = [" ".join(f"word{rng.randrange(900)}" for _ in range(n)) + "." for n in [400] + [120] * 9]
    (folder / "pages.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pages))
    manifest = write_manifest(manifest_path, sources=[{"kind": "local", "name": "web", "paths": [f"{folder}/*.jsonl"]}])
    write_manifest(manifest_path, stages={**manifest["stages"], "clean": {"min_chars": 2000}})
    defs = build_definitions(settings)
    result = materialize_graph(defs, instance, selection="+key:minhash_signatures", log=lambda _: None)
    assert result.success  # a warning holds nothing
    key = dg.AssetCheckKey(dg.AssetKey("clean_corpus"), "kept_fraction_in_bounds")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    evaluation = record.event.dagster_event.event_specific_data
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description == "kept fraction 0.100 outside [0.5, 1.0]"
    assert instance.get_latest_materialization_event(dg.AssetKey("minhash_signatures")) is not None


def test_a_sweep_whose_larger_model_is_worse_fails_fit_quality(settings, manifest_path, instance):
    """The larger size ran with a learning rate too high for it: at every token count its val loss
    is above the smaller one's, so the fitted alpha is negative. fit_quality warns (non-blocking)."""
    with_training(manifest_path)  # two sizes: the graph has a scaling_law
    defs = pretrain_defs(load_manifest(manifest_path))
    real = stage_asset(defs, "scaling_law")
    fit_quality = stage_check(defs, "fit_quality")
    curves = {"xs": (1.0e5, [5.0, 4.6, 4.3]), "s": (4.0e5, [5.6, 5.3, 5.1])}

    @artifact_asset(name="pretrain_checkpoint", partitions_def=stage_asset(defs, "pretrain_checkpoint")
                    .partitions_def, group_name="pretrain", description="stands in for the sweep's checkpoints")
    def pretrain_checkpoint(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                            artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        parameters, losses = curves[context.partition_key]
        history = [[step, 1000 * step, loss] for step, loss in zip((10, 20, 30), losses)]

        def write(out: Path) -> dict:
            (out / "config.json").write_text("{}")
            return {"parameters": parameters, "val_history": dg.MetadataValue.json(history)}

        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model",
                                    config={"stand_in": "pretrain_checkpoint"}, build=write)

    after = next_asset(real)
    for size in curves:
        assert run([pretrain_checkpoint, real, after], [], build_resources(settings), instance, partition=size,
                   selection=[pretrain_checkpoint.key]).success
    result = run([pretrain_checkpoint, real, after], [fit_quality], build_resources(settings), instance,
                 selection=[real.key, after.key])
    gate = verdict(result, "fit_quality")
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.WARN
    assert gate.metadata["alpha"].value < 0
    assert "the larger sizes are not better at the same tokens" in gate.description
    assert materialized(result, after)  # a warning holds nothing


@pytest.fixture
def serving_defs(manifest_path) -> dg.Definitions:
    """The serving stage's own Definitions (server_spec and its checks) for one model size."""
    with_training(manifest_path)
    manifest = write_manifest(manifest_path, model_sizes={"xs": TINY})
    write_manifest(manifest_path, stages={**manifest["stages"], "evaluation": {}, "serving": {}},
                   gates={**manifest["gates"], **SAFETY_GATES})
    return serving_build_defs(load_manifest(manifest_path))


def _server_spec(defs: dg.Definitions, model_sha: str, store_uri: str,
                 edit: Callable[[list[dict]], None] = lambda _: None) -> dg.AssetsDefinition:
    """A server_spec as the real one renders it for `model_sha`, with its manifests passed through `edit`."""
    recipe = ServingRecipe()

    def write(out: Path) -> None:
        spec = spec_document(recipe, "xs", model_sha, "r" * 64, f"{store_uri}/objects/{model_sha}")
        (out / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
        manifests = render_manifests(recipe, "xs", model_sha, "llm-assets:latest", store_uri)
        edit(manifests)
        for filename, resource in zip(spec["manifests"], manifests, strict=True):
            (out / filename).write_text(yaml.safe_dump(resource, sort_keys=False))

    return stand_in("server_spec", "serving", write,
                    partitions_def=stage_asset(defs, "server_spec").partitions_def)


def test_a_deployment_with_a_misspelt_field_fails_manifests_validate_and_holds_the_rollout(
    serving_defs, settings, instance
):
    """`resource:` for `resources:` on the vLLM container: kubectl would reject it (strict)."""

    def misspell(manifests: list[dict]) -> None:
        container = manifests[0]["spec"]["template"]["spec"]["containers"][0]
        container["resource"] = container.pop("resources")

    spec = _server_spec(serving_defs, "a" * 64, settings.store_uri, misspell)
    rollout = next_asset(spec)
    checks = [stage_check(serving_defs, "manifests_validate")]
    result = run([spec, rollout], checks, build_resources(settings), instance, partition="xs")
    gate = verdict(result, "manifests_validate")
    assert not gate.passed and "server_spec[xs] deployment.yaml" in gate.description and "resource" in gate.description
    assert materialized(result, spec) and not materialized(result, rollout)


def test_a_model_smaller_than_its_tokenizer_fails_server_smoke_and_holds_the_rollout(
    serving_defs, settings, instance, tmp_path
):
    """A released model exported with the wrong tokenizer: its embedding table has 64 rows, the
    tokenizer 300 ids. The server loads it and answers 500 to every prompt."""
    recipe = TokenizerRecipe(vocab_size=300)
    tokenizer_dir = tmp_path / "tokenizer"
    save_hf_tokenizer(train_bpe([PYTHON_TEXT], recipe), recipe, tokenizer_dir)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model_dir = save_hf(LlamaForCausalLM(config), tmp_path / "model", tokenizer_dir)
    assert (model_dir / TOKENIZER_FILE).exists()
    model = open_store(settings.store_uri).put_dir(model_dir)

    spec = _server_spec(serving_defs, model.sha256, settings.store_uri)
    rollout = next_asset(spec)
    checks = [stage_check(serving_defs, "server_smoke")]
    result = run([spec, rollout], checks, build_resources(settings), instance, partition="xs")
    gate = verdict(result, "server_smoke")
    assert not gate.passed and "server_spec[xs]: 'def parse(text):': status 500" in gate.description
    assert materialized(result, spec) and not materialized(result, rollout)
