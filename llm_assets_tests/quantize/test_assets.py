"""quantized_model in the graph, on a real instance: both schemes of a size materialize from the
current model and splits, the quality gate is judged on them and blocks when it does not hold,
and a failure names what to do. Upstream artifacts are stored and recorded as materialized
(no training here: the evaluation tests' tiny model stands in for the pretrained checkpoint)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import polars as pl
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.evaluation.conftest import TINY, _chats
from llm_assets_tests.posttrain.test_assets import step_failure
from resources.handles import ArtifactHandle, handle_metadata

QUANTIZE = {"schemes": ["gptq-4bit", "int8"], "group_size": 32, "calibration_texts": 12, "heldout_texts": 16,
            "max_tokens": 96}
GATES = {"pretrain_val_loss": {"max": 10.0}, "quantized_perplexity_increase": {"max": 0.1},
         "quantized_accuracy_drop": {"max": 0.05}}


QUALITY = dg.AssetCheckKey(dg.AssetKey("quantized_model"), "quantization_quality")


def current(instance: dg.DagsterInstance, partition: str) -> dg.AssetMaterialization:
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=QUALITY.asset_key, asset_partitions=[partition]), limit=1,
    ).records[0].asset_materialization


def gptq(size: str = "xs") -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"model_size": size, "scheme": "gptq-4bit"})


def with_quantization(manifest_path: Path, sizes: tuple[str, ...] = ("xs",)) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"]["pretrain"] = {"steps": 1, "batch_size": 1, "seq_len": 32, "learning_rate": 1e-3}
    manifest["stages"]["quantize"] = QUANTIZE
    manifest["stages"]["tokenizer"] = {"vocab_size": TINY.vocab_size}
    manifest["model_sizes"] = {size: TINY.model_dump() for size in sizes}
    manifest["gates"] = GATES
    manifest_path.write_text(yaml.safe_dump(manifest))


def record(instance: dg.DagsterInstance, store, asset: str, partition: str | None, source: Path, kind: str) -> str:
    """Store a directory as the current materialization of an asset partition."""
    ref = store.put_dir(source)
    handle = ArtifactHandle(asset=asset, partition=partition, kind=kind, sha256=ref.sha256, uri=ref.uri,
                            bytes=ref.bytes)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition,
                                                                metadata=handle_metadata(handle)))
    return ref.sha256


def seed_upstream(instance, settings, trained_dir: Path, heldout: pl.DataFrame, tmp_path: Path) -> dict[str, str]:
    store = open_store(settings.store_uri)
    splits = tmp_path / "splits"
    (splits / "train").mkdir(parents=True)
    chats = _chats(heldout)
    train = pl.DataFrame({"id": [f"train-{i}" for i in range(len(chats))], "text": chats})
    train.write_parquet(splits / "train" / "stdlib-0000.parquet")
    heldout.write_parquet(splits / "test.parquet")
    return {"model": record(instance, store, "pretrain_checkpoint", "xs", trained_dir, "hf_model"),
            "splits": record(instance, store, "dataset_splits", None, splits, "dataset_splits")}


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, partition: dg.MultiPartitionKey):
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets("quantized_model"),
                          partition_key=partition, instance=instance, resources=defs.resources, raise_on_error=False)


def test_both_schemes_of_a_size_materialize_and_pass_the_gate(settings, manifest_path, instance, trained_dir,
                                                              heldout, tmp_path):
    with_quantization(manifest_path, sizes=("xs", "xt"))
    upstream = seed_upstream(instance, settings, trained_dir, heldout, tmp_path)  # xs only
    defs = build_definitions(settings)
    # The embedded driver runs model_size × scheme partitions, narrowed by a model size (xt's
    # partitions, which have no model, would fail).
    result = materialize_graph(defs, instance, selection="key:quantized_model", partitions=["xs"], log=lambda _: None)
    assert result.success
    assert sorted(o.partition for o in result.outcomes) == ["xs|gptq-4bit", "xs|int8"]

    store = open_store(settings.store_uri)
    verdicts = {record.partition: record.status.value for record in
                instance.event_log_storage.get_asset_check_execution_history(QUALITY, limit=10)}
    for scheme, bits in (("gptq-4bit", 4), ("int8", 8)):
        partition = f"xs|{scheme}"
        meta = {k: v.value for k, v in current(instance, partition).metadata.items()}
        assert meta["bits"] == bits and meta["model_sha256"] == upstream["model"]
        comparison = meta["comparison"]  # table metadata: full precision | the scheme | change
        assert [(c.name, c.description) for c in comparison.schema.columns][1:] == [
            ("full_precision", None), ("quantized", scheme), ("change", "quantized against full precision")]
        assert 0 < meta["size_ratio"] < 0.7 and meta["quantized_layers"] == 14
        assert {r["asset"]: r["sha256"] for r in meta["input_hashes"]} == {
            "pretrain_checkpoint": upstream["model"], "dataset_splits": upstream["splits"]}
        config = json.loads(store.read_bytes(meta["sha256"], "config.json"))["quantization_config"]
        assert config["quant_method"] == ("gptq" if bits == 4 else "torchao")
        assert verdicts[partition] == "SUCCEEDED"

    # GPTQ was calibrated on the training split, and only on it.
    gptq_sha = current(instance, "xs|gptq-4bit").metadata["sha256"].value
    calibration = [json.loads(line)["text"]
                   for line in store.read_bytes(gptq_sha, "calibration.jsonl").decode().splitlines()]
    assert len(calibration) == QUANTIZE["calibration_texts"] and set(calibration) <= set(_chats(heldout))
    assert not set(calibration) & set(heldout["text"].to_list())


def test_the_gate_blocks_a_quantization_that_loses_too_much(settings, manifest_path, instance, trained_dir,
                                                            heldout, tmp_path):
    with_quantization(manifest_path)
    seed_upstream(instance, settings, trained_dir, heldout, tmp_path)
    manifest = yaml.safe_load(manifest_path.read_text())
    # GPTQ 4-bit cannot be better than −100% perplexity: a bound below any real figure.
    manifest["gates"]["quantized_perplexity_increase"] = {"max": -0.5}
    manifest_path.write_text(yaml.safe_dump(manifest))
    result = materialize(build_definitions(settings), instance, gptq())
    assert not result.success
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert [e.check_name for e in failed] == ["quantization_quality"]
    assert failed[0].severity == dg.AssetCheckSeverity.ERROR
    figure = failed[0].metadata["quantized_perplexity_increase"].value
    assert -0.5 < figure < 0.1
    assert failed[0].description == f"xs|gptq-4bit: quantized_perplexity_increase {figure:.4g} > gate max -0.5"


def test_failures_say_what_to_do(settings, manifest_path, instance, trained_dir, heldout, tmp_path):
    with_quantization(manifest_path)
    seed_upstream(instance, settings, trained_dir, heldout, tmp_path)
    int8 = dg.MultiPartitionKey({"model_size": "xs", "scheme": "int8"})

    missing = replace(settings, quantize_python=str(tmp_path / "no-such-env" / "bin" / "python"))
    result = materialize(build_definitions(missing), instance, int8)
    assert not result.success
    message = step_failure(instance, result.run_id)
    assert "the quantization environment is missing" in message and "make install" in message
    assert "LLM_ASSETS_QUANTIZE_PYTHON" in message

    # An interpreter without the quantization libraries (this one): refused before anything runs.
    result = materialize(build_definitions(replace(settings, quantize_python=sys.executable)), instance, int8)
    assert not result.success
    message = step_failure(instance, result.run_id)
    assert f"the quantization environment at {sys.executable} cannot run the worker" in message
    assert "No package metadata was found for gptqmodel" in message and "make install" in message

    # A model artifact whose weights are not a safetensors file: the worker's error, in one line.
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in trained_dir.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    record(instance, open_store(settings.store_uri), "pretrain_checkpoint", "xs", broken, "hf_model")
    result = materialize(build_definitions(settings), instance, int8)
    assert not result.success
    message = step_failure(instance, result.run_id)
    assert "quantizing pretrain_checkpoint[xs] (int8) failed: RuntimeError: " in message
    assert "transformers cannot load the full-precision model" in message
