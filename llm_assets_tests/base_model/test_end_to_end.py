"""A model the project did not make, end to end through the CLI on a real instance: a tiny GPT-NeoX
(not the project's Llama architecture) whose tokenizer has a chat template, a bos token and no pad
token is imported, fine-tuned, rewarded, aligned with DPO, evaluated with its own tokenizer,
released, quantized to int8 and served by `llm-assets serve`, whose chat completions are prompted
in that chat template."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from llm_assets.checks.hash_gates import INPUT_CHAIN
from llm_assets.cli import main
from llm_assets.definitions import build_definitions
from llm_assets.prompts import render_chat, render_prompt
from llm_assets.release_pointer import current_release, read_release
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.conftest import _free_port, stop_process_group
from llm_assets_tests.posttrain.test_assets import EVALUATION, GATES, POSTTRAIN
from resources.handles import input_records, latest_materializations

# ChatML, as Qwen's and many other chat models' templates write it, after a bos token.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What does json.dumps do?"}]


def save_chatml_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that adds bos when it encodes and has no pad token (as many base
    models' tokenizers), with a ChatML chat template whose end-of-turn token is its eos."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator([inspect.getsource(json.decoder), inspect.getsource(json.encoder)],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(model_dir)
    return tokenizer


@pytest.fixture
def neox_dir(tmp_path) -> Path:
    model_dir = tmp_path / "neox-tiny"
    tokenizer = save_chatml_tokenizer(model_dir)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=len(tokenizer), max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def with_base_model(manifest_path: Path, model_dir: Path) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    trainer = {"max_length": 160}
    manifest["model_sizes"] = {"neox": {"base_model": str(model_dir)}}
    manifest["stages"].update(
        sft={**POSTTRAIN["sft"], **trainer, "steps": 8, "checkpoint_every": 0},
        reward={**POSTTRAIN["reward"], **trainer, "steps": 4},
        policy={**POSTTRAIN["policy"], **trainer, "steps": 4, "kl_prompts": 8},
        posttrain_data={"max_answer_chars": 120}, evaluation=EVALUATION,
        quantize={"schemes": ["int8"], "calibration_texts": 8, "heldout_texts": 8, "max_tokens": 64},
        serving={"smoke_prompts": ["def parse(text):"]})
    manifest["gates"] = {**GATES, "heldout_perplexity.bits_per_byte": {"max": 12.0},
                         "quantized_perplexity_increase": {"max": 1.0}}
    manifest_path.write_text(yaml.safe_dump(manifest))


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def serve_chat(manifest: str, env: dict[str, str], tmp_path: Path) -> dict:
    """A greedy chat completion from `llm-assets serve` of the size's int8 model, the server stopped after."""
    port = _free_port()
    cli = [sys.executable, "-m", "llm_assets.cli", "--manifest", manifest, "serve", "--size", "neox",
           "--scheme", "int8", "--port", str(port), "--log-dir", str(tmp_path / "serve-logs")]
    process = subprocess.Popen(cli, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "serve.log", "wb"))
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.time() < deadline, "the server did not start in 120 s"
                time.sleep(0.5)
        return post(f"http://127.0.0.1:{port}/v1/chat/completions",
                    {"messages": QUESTION, "max_tokens": 6, "temperature": 0})
    finally:
        stop_process_group(process)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the whole lifecycle, from the corpus to a served int8 model
def test_a_gpt_neox_base_model_is_fine_tuned_aligned_evaluated_quantized_and_served_in_its_chat_template(
        settings, manifest_path, tmp_path, monkeypatch, neox_dir, capsys):
    with_base_model(manifest_path, neox_dir)
    env = {"DAGSTER_HOME": str(tmp_path / "home"), "LLM_ASSETS_STORE": settings.store_uri,
           "LLM_ASSETS_ALERTS_JSONL": settings.alerts_jsonl}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "home").mkdir()

    code, captured = main(["--manifest", settings.manifest, "materialize"]), capsys.readouterr()
    print(captured.out, captured.err)  # shown when the test fails: the failed step's error
    assert code == 0
    store = open_store(settings.store_uri)
    with dg.DagsterInstance.get() as instance:
        mats = {asset: latest_materializations(instance, dg.AssetKey(asset), ["neox"])["neox"]
                for asset in ("sft_model", "reward_model", "policy", "eval_report", "release", "server_spec")}
        # The project's tokenizer and pretraining are not built for a base-model size.
        for asset in ("pretrain_checkpoint", "tokenizer", "token_shards"):
            assert not instance.fetch_materializations(dg.AssetKey(asset), limit=1).records, asset
        quantized = instance.fetch_materializations(dg.AssetKey("quantized_model"), limit=1).records
    assert quantized

    # eval_report measured the policy with its own tokenizer: no project tokens among its inputs,
    # and its unigram baseline counted the training split encoded by the model's tokenizer.
    report_inputs = {r["asset"] for r in input_records(mats["eval_report"])}
    assert report_inputs == {"policy", "dataset_splits"}
    report = json.loads(store.read_bytes(mats["eval_report"].metadata["sha256"].value, "report.json"))
    assert 0 < report["baselines"]["heldout_perplexity.bits_per_byte"]["unigram"] < 20
    release = read_release(store, current_release(store, "neox"))
    assert release["model"]["sha256"] == mats["policy"].metadata["sha256"].value
    policy_dir = store.local_dir(mats["policy"].metadata["sha256"].value)
    assert json.loads((policy_dir / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    assert tokenizer.chat_template == CHATML and tokenizer.pad_token == "<|im_end|>"  # eos pads, as trl's

    answer = serve_chat(settings.manifest, {**os.environ, **env}, tmp_path)
    # The prompt the server tokenized is the chat template's (one bos, not two), not the project's format.
    templated = render_chat(tokenizer, QUESTION)
    assert templated.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert answer["usage"]["prompt_tokens"] == len(tokenizer(templated).input_ids)
    assert answer["usage"]["prompt_tokens"] != len(tokenizer(render_prompt(QUESTION)).input_ids)
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_in_a_mixed_manifest_the_base_sizes_report_reads_its_own_tokenizer(settings, manifest_path, neox_dir):
    """Beside a size pretrained here, the base size's eval_report neither reads nor fingerprints the
    project's tokenizer and shards; they are recorded for its input-chain gate, which holds."""
    with_base_model(manifest_path, neox_dir)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"]["xs"] = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                     "vocab_size": 512, "max_seq_len": 64}
    for stage in ("reward", "policy", "quantize", "serving"):
        del manifest["stages"][stage]
    manifest["stages"].update(tokenizer={"vocab_size": 512},
                              pretrain={"steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3})
    manifest["gates"] = {key: GATES[key] for key in ("sft_val_loss", "heldout_perplexity.bits_per_byte",
                                                     "safety.refusal_rate", "safety.benign_refusal_rate")}
    manifest["gates"].update({"pretrain_val_loss": {"max": 20.0}, "heldout_perplexity.bits_per_byte": {"max": 12.0}})
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize_graph(defs, instance, selection="+key:sft_dataset or key:base_model or +key:token_shards",
                                 log=lambda _: None).success
        assert materialize_graph(defs, instance, selection="key:sft_model or key:eval_report", partitions=["neox"],
                                 log=lambda _: None).success
        report = latest_materializations(instance, dg.AssetKey("eval_report"), ["neox"])["neox"]
        chain = dg.AssetCheckKey(dg.AssetKey("eval_report"), INPUT_CHAIN)
        assert instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [chain])[chain].status.value == "SUCCEEDED"
    recorded = {r["asset"] for r in input_records(report)}
    assert recorded == {"sft_model", "dataset_splits", "tokenizer", "token_shards"}
    assert report.metadata["safety.refusal_rate"].value >= 0
