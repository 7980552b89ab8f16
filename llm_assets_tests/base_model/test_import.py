"""Importing a base model of another architecture (Qwen2) from a directory, S3 and the hub, on a
real Dagster instance; every refusal names the file and writes nothing to the store."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from llm_assets.cli import EXIT_OK, main
from llm_assets.definitions import build_definitions, build_resources
from llm_assets.manifest import ManifestError, load_manifest
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.conftest import TEST_MANIFEST
from resources.handles import input_records

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


def save_tokenizer(model_dir: Path) -> None:
    """A small BPE tokenizer with a chat template, saved as a hub model's would be."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<|end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([inspect.getsource(json.decoder), inspect.getsource(json.encoder)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


@pytest.fixture
def qwen_dir(tmp_path) -> Path:
    """A tiny Qwen2 causal LM (not the project's Llama architecture), with its tokenizer and a model card."""
    model_dir = tmp_path / "qwen-tiny"
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    save_tokenizer(model_dir)
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# qwen-tiny\n")
    (model_dir / "training_args.bin").write_bytes(b"not imported")  # pickled extras beside safetensors are left out
    return model_dir


def manifest_with(tmp_path: Path, sizes: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**TEST_MANIFEST, "model_sizes": sizes}, sort_keys=False))
    return path


def import_size(settings, manifest_path: Path, size: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    settings = settings.__class__(**{**settings.__dict__, "manifest": str(manifest_path)})
    defs = build_definitions(settings)
    return dg.materialize([defs.get_assets_def("base_model")], partition_key=size, instance=instance,
                          resources=build_resources(settings, load_manifest(manifest_path)), raise_on_error=False)


def materialization(result: dg.ExecuteInProcessResult) -> dict:
    [mat] = result.asset_materializations_for_node("base_model")
    return {key: value.value for key, value in mat.metadata.items()}


def failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    [event] = [e for e in result.all_events if e.is_step_failure]
    return event.step_failure_data.error.to_string()


def stored_objects(settings) -> list[str]:
    return open_store(settings.store_uri).backend.list_keys("objects/") if Path(settings.store_uri).exists() else []


def test_a_qwen2_directory_is_imported_and_reimported_as_a_cache_hit(settings, tmp_path, qwen_dir):
    path = manifest_with(tmp_path, {"qwen": {"base_model": str(qwen_dir)}})
    with dg.DagsterInstance.ephemeral() as instance:
        first = materialization(import_size(settings, path, "qwen", instance))
        again = materialization(import_size(settings, path, "qwen", instance))
    names = {f.path for f in open_store(settings.store_uri).manifest(first["sha256"]).files}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= names
    assert "training_args.bin" not in names
    assert (first["architecture"], first["license"], first["chat_template"]) == ("Qwen2ForCausalLM", "apache-2.0", True)
    assert first["parameters"] == sum(p.numel() for p in Qwen2ForCausalLM.from_pretrained(qwen_dir).parameters())
    assert (first["cache_hit"], again["cache_hit"], again["sha256"]) == (False, True, first["sha256"])

    (qwen_dir / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    with dg.DagsterInstance.ephemeral() as instance:
        changed = materialization(import_size(settings, path, "qwen", instance))
    assert not changed["cache_hit"] and changed["sha256"] != first["sha256"]


def test_pickle_only_weights_are_refused_naming_the_file_and_nothing_is_stored(settings, tmp_path, qwen_dir):
    weights = qwen_dir / "model.safetensors"
    torch.save(Qwen2ForCausalLM.from_pretrained(qwen_dir).state_dict(), qwen_dir / "pytorch_model.bin")
    weights.unlink()
    path = manifest_with(tmp_path, {"qwen": {"base_model": str(qwen_dir)}})
    with dg.DagsterInstance.ephemeral() as instance:
        message = failure(import_size(settings, path, "qwen", instance))
    assert "pickle" in message and "pytorch_model.bin" in message and str(qwen_dir) in message
    assert stored_objects(settings) == []


def test_a_directory_without_a_tokenizer_is_refused(settings, tmp_path, qwen_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (qwen_dir / name).unlink()
    path = manifest_with(tmp_path, {"qwen": {"base_model": str(qwen_dir)}})
    with dg.DagsterInstance.ephemeral() as instance:
        assert "no tokenizer" in failure(import_size(settings, path, "qwen", instance))
    assert stored_objects(settings) == []


def test_a_model_that_is_no_causal_lm_is_refused_naming_its_config(settings, tmp_path):
    bert_dir = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=128)).save_pretrained(bert_dir)
    save_tokenizer(bert_dir)
    path = manifest_with(tmp_path, {"bert": {"base_model": str(bert_dir)}})
    with dg.DagsterInstance.ephemeral() as instance:
        message = failure(import_size(settings, path, "bert", instance))
    assert f"{bert_dir}/config.json" in message and "BertForMaskedLM" in message and "not a causal" in message
    assert stored_objects(settings) == []


def test_a_missing_path_is_refused(settings, tmp_path):
    path = manifest_with(tmp_path, {"gone": {"base_model": "./models/gone"}})
    with dg.DagsterInstance.ephemeral() as instance:
        message = failure(import_size(settings, path, "gone", instance))
    assert f"{tmp_path}/models/gone: no such directory" in message


def test_a_hub_id_offline_says_download_it_first(settings, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing was downloaded
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    path = manifest_with(tmp_path, {"hub": {"base_model": "Qwen/Qwen2.5-0.5B"}})
    with dg.DagsterInstance.ephemeral() as instance:
        message = failure(import_size(settings, path, "hub", instance))
    assert "'Qwen/Qwen2.5-0.5B' is a hub id and this machine is offline" in message and "download it first" in message


def test_an_s3_prefix_imports_with_the_local_copys_hash(settings, tmp_path, qwen_dir, s3_client, s3_bucket,
                                                        seaweedfs, monkeypatch):
    for file in sorted(p for p in qwen_dir.rglob("*") if p.is_file()):
        s3_client.upload_file(str(file), s3_bucket, f"models/qwen/{file.relative_to(qwen_dir).as_posix()}")
    monkeypatch.setenv("LLM_ASSETS_S3_ENDPOINT_URL", seaweedfs)
    path = manifest_with(tmp_path, {"local": {"base_model": str(qwen_dir)},
                                    "remote": {"base_model": f"s3://{s3_bucket}/models/qwen"},
                                    "unreadable": {"base_model": "s3://no-such-bucket-here/models/qwen"}})
    with dg.DagsterInstance.ephemeral() as instance:
        local = materialization(import_size(settings, path, "local", instance))
        remote = materialization(import_size(settings, path, "remote", instance))
        remote_again = materialization(import_size(settings, path, "remote", instance))
        message = failure(import_size(settings, path, "unreadable", instance))
    assert remote["sha256"] == local["sha256"] and remote_again["cache_hit"]
    assert "s3://no-such-bucket-here/models/qwen: cannot list the S3 prefix" in message


def test_a_manifest_mixing_a_pretrained_and_a_base_size_plans_both_paths(tmp_path, qwen_dir, capsys):
    path = manifest_with(tmp_path, {
        "small": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
                  "vocab_size": 1000, "max_seq_len": 128},
        "qwen": {"base_model": str(qwen_dir)},
        "remote": {"base_model": "s3://models/qwen-tiny"},
    })
    manifest = yaml.safe_load(path.read_text())
    manifest["stages"] = {"pretrain": {"steps": 100, "batch_size": 8, "seq_len": 128, "learning_rate": 1e-3},
                          "tokenizer": {"vocab_size": 1000}}
    manifest["gates"] = {"pretrain_val_loss": {"max": 7.0}}
    path.write_text(yaml.safe_dump(manifest))
    assert main(["--manifest", str(path), "plan"]) == EXIT_OK
    out = capsys.readouterr().out
    # Qwen2's matmuls: q, o 32·32; k, v 32·16 (2 kv heads of 8); the MLP 3·32·64; the LM head 32·512.
    n_qwen = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 32 * 512
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "pretrained here" in lines["small"] and "project's tokenizer" in lines["small"]
    assert f"base model {qwen_dir} imported by base_model (N {n_qwen / 1e3:.2f}k" in lines["qwen"]
    assert "not estimated until imported" in lines["remote"]
    graph = out.split("model sizes:")[0]
    assert "base_model" in graph and "partitions: 2" in graph.split("base_model")[1].splitlines()[0]
    # Pretraining is estimated, and built, for the pretrained size only.
    assert [row.split()[1] for row in out.splitlines() if row.strip().startswith("pretrain ")] == ["small"]


def test_sft_starts_from_the_imported_base_model_with_its_own_tokenizer(settings, tmp_path, qwen_dir):
    """A mixed manifest: the base size's SFT reads base_model[qwen] (no pretraining, no project
    tokenizer), while the pretrained size still reads its pretrain_checkpoint."""
    path = manifest_with(tmp_path, {
        "xs": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 512,
               "max_seq_len": 64},
        "qwen": {"base_model": str(qwen_dir)},
    })
    manifest = yaml.safe_load(path.read_text())
    manifest["stages"].update({
        "tokenizer": {"vocab_size": 512},
        "pretrain": {"steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3},
        "sft": {"steps": 6, "batch_size": 4, "max_length": 256, "learning_rate": 3e-3, "checkpoint_every": 0},
        "posttrain_data": {"max_answer_chars": 160},
    })
    manifest["gates"] = {"pretrain_val_loss": {"max": 20.0}, "sft_val_loss": {"max": 20.0, "blocking": False}}
    path.write_text(yaml.safe_dump(manifest))
    settings = settings.__class__(**{**settings.__dict__, "manifest": str(path)})
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    sft = graph.get(dg.AssetKey("sft_model"))
    assert {p.to_user_string() for p in sft.parent_keys} == {"pretrain_checkpoint", "base_model", "sft_dataset"}
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize_graph(defs, instance, selection="+key:sft_dataset or key:base_model",
                                 log=lambda _: None).success
        assert materialize_graph(defs, instance, selection="key:sft_model", partitions=["qwen"],
                                 log=lambda _: None).success
        sft_mat = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("sft_model"), asset_partitions=["qwen"]), limit=1).records[0].asset_materialization
        base_mat = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("base_model"), asset_partitions=["qwen"]), limit=1).records[0].asset_materialization
        assert not instance.fetch_materializations(dg.AssetKey("pretrain_checkpoint"), limit=1).records
        assert not instance.fetch_materializations(dg.AssetKey("tokenizer"), limit=1).records
    inputs = {record["asset"]: record["sha256"] for record in input_records(sft_mat)}
    assert inputs["base_model"] == base_mat.metadata["sha256"].value and "pretrain_checkpoint" not in inputs
    model_dir = open_store(settings.store_uri).local_dir(sft_mat.metadata["sha256"].value)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template") or \
        (model_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_a_size_is_either_an_architecture_or_a_base_model(tmp_path):
    path = manifest_with(tmp_path, {"both": {"base_model": "./models/qwen", "hidden_size": 64}})
    with pytest.raises(ManifestError, match=r"pipeline.yaml:\d+: unknown field 'model_sizes.both.hidden_size'"):
        load_manifest(path)
    path = manifest_with(tmp_path, {"neither": {"num_layers": 2}})
    with pytest.raises(ManifestError, match=r"model_sizes.neither.hidden_size: field required"):
        load_manifest(path)
    sizes = load_manifest(manifest_with(tmp_path, {"hub": {"base_model": "Qwen/Qwen2.5-0.5B"},
                                                   "local": {"base_model": "models/org/qwen"},
                                                   "s3": {"base_model": "s3://bucket/qwen"}})).base_model_sizes
    assert sizes["hub"].base_model == "Qwen/Qwen2.5-0.5B" and sizes["s3"].base_model == "s3://bucket/qwen"
    assert sizes["local"].base_model == str(tmp_path / "models/org/qwen")
