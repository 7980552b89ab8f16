"""Continued pretraining on a real instance: a tiny GPT-NeoX base model (not the project's Llama) is
trained further on the corpus tokenized by its own tokenizer, judged against its own val loss,
exported with that tokenizer, resumed from a committed checkpoint rather than restarted, and SFT
starts from it."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.cli import EXIT_OK, main
from llm_assets.costs import plan_estimates
from llm_assets.definitions import build_definitions
from llm_assets.manifest import ManifestError, load_manifest
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.base_model.test_end_to_end import neox_dir  # noqa: F401
from llm_assets_tests.posttrain.test_assets import POSTTRAIN
from resources.handles import input_records, latest_materializations

PRETRAIN = dg.AssetKey("pretrain_checkpoint")
CONTINUED = {"steps": 20, "batch_size": 4, "seq_len": 32, "learning_rate": 3e-3, "warmup_steps": 2,
             "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10}


def with_continued_pretraining(manifest_path: Path, model_dir: Path) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"] = {"neox": {"base_model": str(model_dir), "continued_pretraining": True}}
    manifest["stages"].update(pretrain=CONTINUED, posttrain_data={"max_answer_chars": 120},
                              sft={**POSTTRAIN["sft"], "max_length": 160, "steps": 2, "checkpoint_every": 0})
    # The val loss may not rise above the base model's own on the same windows by more than 0.05.
    manifest["gates"] = {"continued_pretrain_val_loss": {"baseline": "base", "max_delta": 0.05},
                         "sft_val_loss": {"max": 20.0, "blocking": False}}
    manifest_path.write_text(yaml.safe_dump(manifest))


def check_status(instance: dg.DagsterInstance, check: str) -> str:
    key = dg.AssetCheckKey(PRETRAIN, check)
    return instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].status.value


def test_continued_pretraining_needs_its_recipe_and_gate(manifest_path, neox_dir):  # noqa: F811
    with_continued_pretraining(manifest_path, neox_dir)
    manifest = yaml.safe_load(manifest_path.read_text())
    del manifest["gates"]["continued_pretrain_val_loss"]
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match="add gates.continued_pretrain_val_loss"):
        load_manifest(manifest_path)
    del manifest["stages"]["pretrain"]
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match="trains with the recipe of stages.pretrain"):
        load_manifest(manifest_path)


def test_the_plan_shows_the_path_and_prices_it_from_the_base_model(manifest_path, neox_dir, capsys):  # noqa: F811
    with_continued_pretraining(manifest_path, neox_dir)
    [(_, partition, estimate)] = [row for row in plan_estimates(load_manifest(manifest_path), "cpu")
                                  if row[0] == "pretrain"]
    # N is the base model's own matmul weights (GPT-NeoX: 2 layers of width 32, and its LM head).
    assert partition == "neox" and estimate.params == 2 * (32 * 96 + 32 * 32 + 2 * 32 * 64) + 32 * 600
    assert estimate.tokens == 20 * 4 * 32
    assert main(["--manifest", str(manifest_path), "plan"]) == EXIT_OK
    assert "-> continued pretraining (pretrain_checkpoint, on the corpus in that tokenizer) -> sft" in \
        capsys.readouterr().out


@pytest.mark.slow  # 40 to 100 s on two shared cores
def test_a_gpt_neox_base_is_pretrained_further_resumed_and_fine_tuned(settings, manifest_path, neox_dir):  # noqa: F811
    with_continued_pretraining(manifest_path, neox_dir)
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get(PRETRAIN).parent_keys} == {"base_model", "continued_pretrain_tokens"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("sft_model")).parent_keys} >= {"pretrain_checkpoint"}
    store = open_store(settings.store_uri)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize_graph(defs, instance, selection="+key:continued_pretrain_tokens or +key:sft_dataset",
                                 log=lambda _: None).success
        assert materialize_graph(defs, instance, selection="key:pretrain_checkpoint or key:sft_model",
                                 log=lambda _: None).success
        assert check_status(instance, "training_sane") == "SUCCEEDED"
        mats = {a: latest_materializations(instance, dg.AssetKey(a), ["neox"])["neox"]
                for a in ("pretrain_checkpoint", "sft_model", "base_model")}

        # A run killed after the checkpoint of step 10 was committed: that checkpoint is the step's
        # progress, and no finished artifact is indexed. The rerun continues from step 10 (exact
        # on CPU: the same model as the uninterrupted run), it does not start over.
        fingerprint = mats["pretrain_checkpoint"].metadata["fingerprint"].value
        [step_10] = [f.parent.parent.name for f in (Path(settings.store_uri) / "objects").glob("*/files/state.json")
                     if json.loads(f.read_text())["step"] == 10]
        store.progress_record("pretrain_checkpoint", "neox", fingerprint, step_10, 10)
        for record in (Path(settings.store_uri) / "index" / "pretrain_checkpoint").rglob("*.json"):
            record.unlink()
        assert materialize_graph(defs, instance, selection="key:pretrain_checkpoint", log=lambda _: None).success
        resumed = latest_materializations(instance, PRETRAIN, ["neox"])["neox"].metadata
    meta = {k: v.value for k, v in mats["pretrain_checkpoint"].metadata.items()}
    assert meta["resumed_from_step"] == -1 and resumed["resumed_from_step"].value == 10
    assert resumed["cache_hit"].value is False and resumed["sha256"].value == meta["sha256"]
    # Measured on the same val windows: the base model as imported, and the model after 20 steps.
    assert meta["final_val_loss"] <= meta["base_val_loss"] + 0.05, meta
    assert "untrained_val_loss" not in meta and meta["parameters"] > 0
    assert {r["asset"] for r in input_records(mats["pretrain_checkpoint"])} == {"base_model",
                                                                                "continued_pretrain_tokens"}
    # SFT starts from the continued checkpoint, not from the raw base model.
    sft_inputs = {r["asset"]: r["sha256"] for r in input_records(mats["sft_model"])}
    assert sft_inputs["pretrain_checkpoint"] == meta["sha256"] and "base_model" not in sft_inputs

    # HF layout with the base model's tokenizer (and chat template): every later stage reads it as the base.
    checkpoint_dir = store.local_dir(meta["sha256"])
    base_dir = store.local_dir(mats["base_model"].metadata["sha256"].value)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert (checkpoint_dir / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(checkpoint_dir).chat_template == AutoTokenizer.from_pretrained(
        base_dir).chat_template
    assert json.loads((checkpoint_dir / "config.json").read_text())["vocab_size"] == model.config.vocab_size
