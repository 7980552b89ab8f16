"""A corrupt checkpoint is never evaluated: eval_report verifies the model it reads (the pretrained
checkpoint's files against the hash its materialization recorded) before it loads it, and fails
naming the file and both hashes, with nothing recorded. Upstream artifacts are stored and recorded
as materialized (no training: the untrained tiny model stands in for the pretrained checkpoint)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.store import hash_file, open_store
from llm_assets_tests.checks.test_input_verification import expected_digest, failures, objects
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.evaluation.conftest import TINY, record_eval_inputs
from llm_assets_tests.store.test_store import flip_byte

WEIGHTS = "model.safetensors"


def with_evaluation(manifest_path: Path) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"]["pretrain"] = {"steps": 1, "batch_size": 1, "seq_len": 32, "learning_rate": 1e-3}
    manifest["stages"]["tokenizer"] = {"vocab_size": TINY.vocab_size}
    manifest["stages"]["evaluation"] = {"max_docs": 4, "batch_size": 4, "safety_max_new_tokens": 4}
    manifest["model_sizes"] = {"xs": TINY.model_dump()}
    manifest["gates"] = {"pretrain_val_loss": {"max": 10.0}, **SAFETY_GATES}
    manifest_path.write_text(yaml.safe_dump(manifest))


def test_a_corrupt_checkpoint_fails_the_evaluation_before_it_is_loaded(settings, manifest_path, instance,
                                                                       untrained_dir, heldout, tokenizer_dir,
                                                                       shard_dir, tmp_path):
    with_evaluation(manifest_path)
    store = open_store(settings.store_uri)
    defs = build_definitions(settings)
    model_sha = record_eval_inputs(defs, instance, store, untrained_dir, heldout, tokenizer_dir, shard_dir, tmp_path)
    flip_byte(store, model_sha, WEIGHTS, offset=4096)
    expected = expected_digest(store, model_sha, WEIGHTS)
    actual = hash_file(store.local_dir(model_sha) / WEIGHTS)[0]
    before = objects(settings.store_uri)

    result = materialize_graph(defs, instance, selection="key:eval_report", log=lambda _: None)
    assert not result.success and result.outcomes == []
    text = failures(instance, result.failed_runs)
    assert "eval_report[xs] did not run" in text
    assert f"pretrain_checkpoint[xs] {model_sha[:12]}: {WEIGHTS}: expected sha256 {expected} (its manifest), " \
           f"actual {actual}" in text
    assert "key:pretrain_checkpoint" in text and "llm-assets verify" in text
    for intact in ("dataset_splits", "token_shards", "tokenizer["):
        assert intact not in text.split("Nothing was built")[0], f"the intact input {intact} is not named"
    assert instance.get_latest_materialization_event(dg.AssetKey("eval_report")) is None
    assert objects(settings.store_uri) == before, "no new artifact"
    assert not (Path(settings.store_uri) / "index" / "eval_report").exists(), "nothing recorded"
