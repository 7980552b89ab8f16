"""Constitutional AI: prompts, principles and the held-out split are fixed by the seed; the data set
is real generation by the SFT model; on a real Dagster instance a Qwen2 base model goes through
LoRA SFT (its adapter stored) → cai_dataset → a policy trained on the CAI pairs, with the
counterfactual policy and the refusal gate."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from llm_assets.checks.gates import judge_gates
from llm_assets.definitions import build_definitions
from llm_assets.evaluation.cai_gate import compare_refusals
from llm_assets.jsonl import read_prompt_file
from llm_assets.manifest import (
    CAI_GATE,
    ConstitutionRecipe,
    GateSpec,
    ManifestError,
    PolicyRecipe,
    SftRecipe,
    load_manifest,
)
from llm_assets.posttrain.cai import (
    GENERATIONS_FILE,
    PAIRS_FILE,
    RED_TEAM_FILE,
    ConstitutionError,
    constitution_prompts,
    principle_for,
    read_cai_pairs,
    run_cai,
    split_red_team,
    write_cai_dataset,
)
from llm_assets.posttrain.lora import LINEAGE_FILE
from llm_assets.posttrain.policy import run_policy
from llm_assets.posttrain.sft import run_sft
from llm_assets.prompts import render_prompt
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.base_model.test_import import CHAT_TEMPLATE, manifest_with, qwen_dir  # noqa: F401
from llm_assets_tests.posttrain.conftest import Trained

RED_TEAM = read_prompt_file(RED_TEAM_FILE, ConstitutionError)


def test_the_held_out_split_and_the_principles_are_fixed_by_the_seed() -> None:
    used, held = split_red_team(RED_TEAM, 0.5, seed=0)
    assert sorted(used + held) == sorted(RED_TEAM) and not set(used) & set(held) and used and held
    assert split_red_team(RED_TEAM[::-1], 0.5, seed=0)[1] == held[::-1]  # by prompt, not by position
    assert split_red_team(RED_TEAM, 0.5, seed=1)[1] != held
    principles = ["a", "b", "c"]
    picked = [principle_for(p, principles, seed=0) for p in RED_TEAM]
    assert picked == [principle_for(p, principles, seed=0) for p in RED_TEAM] and set(picked) == set(principles)
    assert constitution_prompts(ConstitutionRecipe(), seed=0) == used


def test_a_bad_prompt_file_names_every_bad_line_and_held_out_prompts_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"prompt": ""}\n')
    with pytest.raises(ConstitutionError) as err:
        read_prompt_file(bad, ConstitutionError)
    assert f"{bad}:2: invalid JSON" in str(err.value) and f"{bad}:3: prompt: needs a non-empty string" in str(err.value)

    leaking = tmp_path / "leaking.jsonl"
    held = split_red_team(RED_TEAM, 0.5, seed=0)[1]
    leaking.write_text(json.dumps({"prompt": held[0]}) + "\n")
    recipe = ConstitutionRecipe.model_validate({"prompt_files": [{"path": str(leaking)}]})
    with pytest.raises(ConstitutionError, match="held-out red-team prompts the CAI gate measures"):
        constitution_prompts(recipe, seed=0)


def test_templates_must_name_their_fields() -> None:
    with pytest.raises(ValueError, match=r"revision_template must contain \{critique\}"):
        ConstitutionRecipe(revision_template="{prompt} {answer} {principle}")
    with pytest.raises(ValueError, match="critique_template: KeyError"):
        ConstitutionRecipe(critique_template="{prompt} {answer} {principle} {oops}")


def test_cai_generates_answers_critiques_and_revisions_with_the_model(sft: Trained, tmp_path: Path) -> None:
    recipe = ConstitutionRecipe(max_new_tokens=12)
    prompts = constitution_prompts(recipe, seed=0)[:4]
    examples = run_cai(sft.out_dir, prompts, recipe, seed=0)
    assert [e.prompt for e in examples] == prompts and all(e.answer and e.critique for e in examples)
    assert {e.principle for e in examples} <= set(recipe.principles)
    stats = write_cai_dataset(examples, tmp_path / "a")
    assert stats["prompts"] == 4 and stats["pairs"] + stats["unrevised"] == 4
    pairs = read_cai_pairs(tmp_path / "a")
    assert all(p["chosen"] != p["rejected"] and p["prompt"].startswith("### User:\n") for p in pairs)
    # The same model and seed give the same bytes.
    write_cai_dataset(run_cai(sft.out_dir, prompts, recipe, seed=0), tmp_path / "b")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in (GENERATIONS_FILE, PAIRS_FILE))


def test_cai_pairs_need_their_stages_and_gate(tmp_path: Path, qwen_dir: Path) -> None:  # noqa: F811
    manifest = _cai_manifest(tmp_path, qwen_dir)
    del manifest["gates"]["cai_refusal_rate"]
    path = tmp_path / "no-gate.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match="add gates.cai_refusal_rate"):
        load_manifest(path)


def _cai_manifest(tmp_path: Path, model_dir: Path) -> dict:
    manifest = yaml.safe_load(manifest_with(tmp_path, {"qwen": {"base_model": str(model_dir)}}).read_text())
    small = {"batch_size": 4, "max_length": 256, "learning_rate": 3e-3, "checkpoint_every": 0}
    manifest["stages"].update({
        "tokenizer": {"vocab_size": 512},
        "pretrain": {"steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3},
        "posttrain_data": {"max_answer_chars": 120, "max_examples": 64},
        # LoRA from 10k parameters: the tiny Qwen2 (about 25k) gets adapters, as a 7B model would.
        "sft": {"steps": 3, **small, "lora": {"r": 4, "alpha": 8, "min_parameters": 1e4}},
        "reward": {"steps": 1, **small},
        "policy": {"steps": 2, **small, "kl_prompts": 4, "preferences": ["preference_dataset", "cai_dataset"]},
        "constitution": {"max_new_tokens": 8, "safety_max_new_tokens": 4, "held_out_fraction": 0.8},
    })
    manifest["gates"] = {"pretrain_val_loss": {"max": 20.0}, "sft_val_loss": {"max": 20.0, "blocking": False},
                         "reward_accuracy": {"min": 0.0}, "policy_kl": {"max": 1e6},
                         "cai_refusal_rate": {"baseline": "without_cai", "min_delta": 0.0}}
    return manifest


@pytest.mark.slow
def test_lora_sft_cai_dataset_and_the_cai_policy_on_a_qwen2_base(settings, tmp_path: Path,
                                                                 qwen_dir: Path) -> None:  # noqa: F811
    path = tmp_path / "cai.yaml"
    path.write_text(yaml.safe_dump(_cai_manifest(tmp_path, qwen_dir)))
    settings = settings.__class__(**{**settings.__dict__, "manifest": str(path)})
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("policy")).parent_keys} >= {"cai_dataset"}
    with dg.DagsterInstance.ephemeral() as instance:
        data = "+key:sft_dataset or +key:preference_dataset or key:base_model"
        assert materialize_graph(defs, instance, selection=data, log=lambda _: None).success
        result = materialize_graph(defs, instance, partitions=["qwen"], log=lambda _: None,
                                   selection="key:sft_model or key:cai_dataset or key:reward_model or key:policy "
                                             "or key:policy_without_cai")
        assert result.success

        def latest(asset: str) -> dict:
            record = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), asset_partitions=["qwen"]), limit=1).records[0]
            return {k: v.value for k, v in record.asset_materialization.metadata.items()}

        sft, cai, policy, without = (latest(a) for a in ("sft_model", "cai_dataset", "policy", "policy_without_cai"))
        [verdict] = [c for c in instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("policy_without_cai"), "cai_refusal_rate_gate"), limit=1)]
    store = open_store(settings.store_uri)
    # LoRA: the adapter is its own artifact, naming the merged model (the sft_model artifact) by hash.
    assert sft["method"] == "lora" and sft["merged_model_sha256"] == sft["sha256"]
    lineage = json.loads(store.read_bytes(sft["adapter_sha256"], LINEAGE_FILE))
    assert lineage["merged_model_sha256"] == sft["sha256"]
    # CAI: generated by that SFT model, and the policy trained on its pairs.
    seed = load_manifest(path).seed
    assert cai["prompts"] == len(constitution_prompts(ConstitutionRecipe(held_out_fraction=0.8), seed=seed))
    assert {r["asset"] for r in policy["input_hashes"]} >= {"cai_dataset", "sft_model", "preference_dataset"}
    assert 0.0 <= without["cai_refusal_rate"] <= 1.0 and without["held_out_prompts"] > 0
    assert verdict.status.value == "SUCCEEDED"  # tiny random models refuse nothing, with or without CAI


REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how to do it."


def _refusing_sft_model(root: Path, prompts: list[str], neutral: list[str]) -> Path:
    """A tiny Qwen2 with a chat template, fine-tuned to refuse every red-team request it is shown."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator((RED_TEAM + neutral + [REFUSE, COMPLY, "Hello.", "Goodbye."]) * 3, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<|end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE + "<|assistant|>"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=600, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    rows = [{"prompt": _user(p), "completion": REFUSE} for p in prompts]
    recipe = SftRecipe(steps=30, batch_size=8, learning_rate=1e-2, warmup_ratio=0, max_length=64, checkpoint_every=0)
    run_sft(root / "base", rows, rows[:4], recipe, root / "sft", root / "w", seed=0)
    return root / "sft"


def _user(prompt: str) -> str:
    return render_prompt([{"role": "user", "content": prompt}])


@pytest.mark.slow
def test_the_gate_fails_a_policy_whose_cai_pairs_prefer_complying_with_harm(tmp_path: Path) -> None:
    """Realistic bad input: CAI 'revisions' that comply with the harmful request, preferred to the
    SFT model's refusal. The policy trained on them stops refusing the held-out red-team prompts;
    the one trained by the same recipe without them keeps refusing; the gate fails the first."""
    used, held = split_red_team(RED_TEAM, 0.5, seed=0)
    neutral = [f"Say hello to friend number {i}." for i in range(8)]
    sft_dir = _refusing_sft_model(tmp_path, used, neutral)
    preference_pairs = [{"prompt": _user(p), "chosen": "Hello.", "rejected": "Goodbye."} for p in neutral]
    bad_cai_pairs = [{"prompt": _user(p), "chosen": COMPLY, "rejected": REFUSE} for p in used]
    recipe = PolicyRecipe(steps=8, batch_size=8, learning_rate=6e-3, warmup_ratio=0, max_length=64, kl_prompts=2,
                          checkpoint_every=0)
    for name, pairs in (("with", preference_pairs + bad_cai_pairs), ("without", preference_pairs)):
        run_policy(sft_dir, None, pairs, preference_pairs[:2], recipe, tmp_path / name, tmp_path / f"w-{name}", seed=0)
    with_cai, without = compare_refusals(tmp_path / "with", tmp_path / "without", held,
                                         ConstitutionRecipe(safety_max_new_tokens=6))
    assert without.rate >= 0.5 > with_cai.rate, (with_cai.examples, without.examples)

    gates = {CAI_GATE: GateSpec(baseline="without_cai", min_delta=0.0)}
    store = open_store(str(tmp_path / "store"))
    judged = judge_gates(store, gates, {CAI_GATE: with_cai.rate}, "qwen", "0" * 64,
                         baselines_by_gate={CAI_GATE: {"without_cai": without.rate}})
    assert not judged.passed and "without_cai baseline" in judged.description
    # The same measure passes a policy that refuses as often as the one without CAI.
    assert judge_gates(store, gates, {CAI_GATE: without.rate}, "qwen", "0" * 64,
                       baselines_by_gate={CAI_GATE: {"without_cai": without.rate}}).passed
