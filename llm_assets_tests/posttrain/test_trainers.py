"""The trl stages learn a synthetic task; their figures are what they say; an interrupted run resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerState

from llm_assets.manifest import GrpoSpec, LoraSpec, PolicyRecipe, SftRecipe
from llm_assets.posttrain.common import LogCallback, config_kwargs
from llm_assets.posttrain.policy import run_policy
from llm_assets.posttrain.rows import SFT_KEYS, records
from llm_assets.posttrain.scoring import completion_loss, encode, pairwise, policy_kl, reward_pairwise
from llm_assets.posttrain.sft import SftResult, run_sft
from llm_assets_tests.posttrain import synthetic
from llm_assets_tests.posttrain.conftest import SFT, Trained

TRAIN, VAL = synthetic.sft_rows(held_out=False), synthetic.sft_rows(held_out=True)
PAIRS, VAL_PAIRS = synthetic.preference_rows(held_out=False), synthetic.preference_rows(held_out=True)
DPO = PolicyRecipe(steps=20, batch_size=8, learning_rate=1e-3, beta=0.1, checkpoint_every=0, kl_prompts=8)
GRPO = PolicyRecipe(algorithm="grpo", steps=6, batch_size=8, learning_rate=1e-3, beta=0.1, checkpoint_every=0,
                    grpo=GrpoSpec(num_generations=4, max_completion_length=16))


class Interrupted(Exception):
    pass


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_sft_learns_the_task(sft: Trained) -> None:
    result, run = sft.result, sft.result.training
    assert [record.step for record in run.history] == list(range(1, SFT.steps + 1))
    assert run.final_train_loss == pytest.approx(_mean([r.loss for r in run.history[-10:]]))
    assert run.final_train_loss < 0.5 * _mean([r.loss for r in run.history[:3]])
    # Held-out size/shape combinations: the model learnt the format and the rule, not the rows.
    assert result.val_loss < 0.5 * result.base_val_loss
    assert result.val_rows == len(VAL) and run.train_samples == len(TRAIN)
    assert run.steps_done == SFT.steps and run.resumed_from_step is None and run.precision == "fp32"
    assert run.steps_per_second > 0 and result.wall_seconds > run.train_seconds > 0


def test_sft_val_loss_is_the_completion_loss_trl_trains(sft: Trained) -> None:
    # One eval batch holds every val row, so trl's eval loss (mean over completion tokens) must be ours:
    # the figure encodes rows exactly as SFTTrainer does.
    evals = sft.result.training.evals
    assert [e.step for e in evals] == [15, 30]
    assert evals[-1].metrics["eval_loss"] == pytest.approx(sft.result.val_loss, rel=1e-4)


def test_sft_export_is_a_plain_causal_lm(sft: Trained) -> None:
    model = AutoModelForCausalLM.from_pretrained(sft.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft.out_dir)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    loss = completion_loss(model, tokenizer, VAL, max_length=SFT.max_length)
    assert loss == pytest.approx(sft.result.val_loss, rel=1e-5)


def test_lora_exports_merged_weights(base_dir: Path, tmp_path: Path) -> None:
    recipe = SFT.model_copy(update={"method": "lora", "steps": 10, "eval_every": 0, "learning_rate": 1e-2,
                                    "lora": LoraSpec(r=4, alpha=8)})
    result = run_sft(base_dir, TRAIN, VAL, recipe, tmp_path / "model", tmp_path / "work", seed=0)

    assert result.val_loss < result.base_val_loss
    base, merged = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert set(merged) == set(base)  # no lora_A / lora_B / base_layer keys
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a LoRA target
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.architectures == ["LlamaForCausalLM"]


RESUMABLE = SftRecipe(steps=6, batch_size=8, learning_rate=3e-3, checkpoint_every=2)


@pytest.fixture(scope="module")
def uninterrupted(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SftResult, Path, list[int]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    committed: list[int] = []
    result = run_sft(base_dir, TRAIN, VAL, RESUMABLE, root / "model", root / "work", seed=0,
                     on_checkpoint=lambda path, step: committed.append(step))
    return result, root / "model", committed


@pytest.fixture(scope="module")
def first_checkpoint(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint-2 directory of a run stopped by its first on_checkpoint."""
    root = tmp_path_factory.mktemp("interrupted")
    committed: list[Path] = []

    def commit_then_fail(path: Path, step: int) -> None:
        committed.append(path)
        raise Interrupted

    with pytest.raises(Interrupted):
        run_sft(base_dir, TRAIN, VAL, RESUMABLE, root / "model", root / "work", seed=0, on_checkpoint=commit_then_fail)
    assert [p.name for p in committed] == ["checkpoint-2"]
    return committed[0]


def test_checkpoints_are_committed_every_checkpoint_every_steps(uninterrupted) -> None:
    _, _, committed = uninterrupted
    assert committed == [2, 4, 6]


def test_resume_continues_the_interrupted_run(base_dir: Path, uninterrupted, first_checkpoint: Path,
                                              tmp_path: Path) -> None:
    full, full_dir, _ = uninterrupted
    logged: list[dict] = []
    resumed = run_sft(base_dir, TRAIN, VAL, RESUMABLE, tmp_path / "model", tmp_path / "work", seed=0,
                      resume_from=first_checkpoint, on_log=logged.append)

    run = resumed.training
    assert run.resumed_from_step == 2 and run.steps_done == RESUMABLE.steps
    assert [r.step for r in run.history] == list(range(1, 7))  # the steps before the resume come from the checkpoint
    assert sorted({line["step"] for line in logged if "loss" in line}) == [3, 4, 5, 6]
    assert [r.loss for r in run.history] == pytest.approx([r.loss for r in full.training.history], abs=1e-6)
    weights, reference = load_file(tmp_path / "model" / "model.safetensors"), load_file(full_dir / "model.safetensors")
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(base_dir: Path, first_checkpoint: Path, tmp_path: Path) -> None:
    longer = RESUMABLE.model_copy(update={"steps": 8})
    with pytest.raises(ValueError, match="steps: checkpoint 6, recipe 8"):
        run_sft(base_dir, TRAIN, VAL, longer, tmp_path / "model", tmp_path / "work", seed=0,
                resume_from=first_checkpoint)
    with pytest.raises(FileNotFoundError, match="not a trl checkpoint"):
        run_sft(base_dir, TRAIN, VAL, RESUMABLE, tmp_path / "model", tmp_path / "work", seed=0,
                resume_from=tmp_path)


def test_reward_model_ranks_held_out_pairs(reward: Trained) -> None:
    result = reward.result
    assert result.held_out.pairs == len(VAL_PAIRS)
    assert result.held_out.accuracy >= 0.75 and result.held_out.accuracy > result.held_out_before.accuracy
    assert result.held_out.mean_margin > 0
    history = result.training.history
    assert result.training.final_train_loss < _mean([r.loss for r in history[:3]])

    model = AutoModelForSequenceClassification.from_pretrained(reward.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(reward.out_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert reward_pairwise(model, tokenizer, VAL_PAIRS, max_length=256) == result.held_out


def test_dpo_moves_the_policy_toward_the_chosen_answers(sft: Trained, tmp_path: Path) -> None:
    logged: list[dict] = []
    result = run_policy(sft.out_dir, None, PAIRS, VAL_PAIRS, DPO, tmp_path / "model", tmp_path / "work", seed=0,
                        on_log=logged.append)

    assert result.algorithm == "dpo" and result.kl_rows == DPO.kl_prompts
    assert 0 < result.kl_nats_per_sequence < math.inf
    # Before training the implicit reward is 0 for every completion: an accuracy of 0.5.
    assert result.implicit_reward.accuracy > 0.5 and result.implicit_reward.mean_margin > 0
    history = result.training.history
    assert history[0].loss == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    assert result.training.final_train_loss < history[0].loss
    assert [line["step"] for line in logged if "loss" in line] == list(range(1, DPO.steps + 1))

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(sft.out_dir)
    kl = policy_kl(policy, reference, tokenizer, VAL_PAIRS[: DPO.kl_prompts], max_length=DPO.max_length)
    assert kl == pytest.approx(result.kl_nats_per_sequence, rel=1e-4)


def test_grpo_trains_on_the_reward_model(sft: Trained, reward: Trained, tmp_path: Path) -> None:
    result = run_policy(sft.out_dir, reward.out_dir, PAIRS, VAL_PAIRS, GRPO, tmp_path / "model", tmp_path / "work",
                        seed=0)

    assert result.algorithm == "grpo" and result.implicit_reward is None
    assert result.training.steps_done == GRPO.steps
    rewards = [r.metrics["rewards/reward_model/mean"] for r in result.training.history]
    assert len(rewards) == GRPO.steps and all(math.isfinite(r) for r in rewards)
    assert 0 < result.kl_nats_per_sequence < math.inf
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.architectures == ["LlamaForCausalLM"]


def test_grpo_refuses_partial_groups_and_a_missing_reward_model(sft: Trained, reward: Trained,
                                                                tmp_path: Path) -> None:
    partial = GRPO.model_copy(update={"batch_size": 6})
    with pytest.raises(ValueError, match="not a multiple of grpo.num_generations = 4"):
        run_policy(sft.out_dir, reward.out_dir, PAIRS, VAL_PAIRS, partial, tmp_path / "m", tmp_path / "w", seed=0)
    with pytest.raises(ValueError, match="grpo needs reward_dir"):
        run_policy(sft.out_dir, None, PAIRS, VAL_PAIRS, GRPO, tmp_path / "m", tmp_path / "w", seed=0)


def test_policy_kl_is_the_summed_exact_kl_of_each_completion_position(sft: Trained, base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sft.out_dir)
    policy = AutoModelForCausalLM.from_pretrained(sft.out_dir)
    reference = AutoModelForCausalLM.from_pretrained(base_dir)
    assert policy_kl(policy, policy, tokenizer, VAL_PAIRS, max_length=256) == pytest.approx(0, abs=1e-6)

    per_row = []
    for row in VAL_PAIRS[:3]:
        encoded = encode(tokenizer, row["prompt"], row["chosen"], 256)
        ids = torch.tensor([encoded.ids])
        with torch.no_grad():
            p = policy(ids).logits[0, encoded.completion_start - 1 : -1].log_softmax(-1)
            q = reference(ids).logits[0, encoded.completion_start - 1 : -1].log_softmax(-1)
        per_row.append(F.kl_div(q, p, log_target=True, reduction="sum").item())  # Σ p·(log p − log q)
    # Three rows of different lengths in one padded batch: padding must not change the figure.
    assert policy_kl(policy, reference, tokenizer, VAL_PAIRS[:3], max_length=256) == pytest.approx(_mean(per_row),
                                                                                                  rel=1e-4)


def test_completion_loss_is_the_mean_over_completion_tokens(sft: Trained) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sft.out_dir)
    model = AutoModelForCausalLM.from_pretrained(sft.out_dir)
    nll, tokens = 0.0, 0
    for row in VAL[:3]:
        encoded = encode(tokenizer, row["prompt"], row["completion"], 256)
        labels = torch.tensor([[-100] * encoded.completion_start + encoded.completion_ids])
        with torch.no_grad():
            loss = model(torch.tensor([encoded.ids]), labels=labels).loss.item()
        n = len(encoded.completion_ids)
        nll, tokens = nll + loss * n, tokens + n
    assert completion_loss(model, tokenizer, VAL[:3], max_length=256) == pytest.approx(nll / tokens, rel=1e-5)


def test_encode_appends_eos_once_and_truncates_from_the_end(sft: Trained) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sft.out_dir)
    row = VAL[0]
    encoded = encode(tokenizer, row["prompt"], row["completion"], 256)
    assert encoded.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.completion_ids, skip_special_tokens=True) == row["completion"]
    assert encode(tokenizer, row["prompt"], row["completion"] + tokenizer.eos_token, 256) == encoded
    assert encode(tokenizer, row["prompt"], row["completion"], 5).ids == encoded.ids[:5]
    with pytest.raises(ValueError, match="every prompt fills max_length=5"):
        completion_loss(AutoModelForCausalLM.from_pretrained(sft.out_dir), tokenizer, VAL, max_length=5)


def test_pairwise_counts_a_tie_as_half() -> None:
    figures = pairwise(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert (figures.accuracy, figures.mean_margin, figures.pairs) == (0.5, 0.0, 3)


def test_rows_are_checked_at_the_door() -> None:
    assert records(Dataset.from_list(VAL), SFT_KEYS, "SFT val") == VAL
    assert records([{**VAL[0], "id": 7}], SFT_KEYS, "SFT val") == VAL[:1]
    with pytest.raises(ValueError, match="SFT train row 1 has no completion"):
        records([VAL[0], {"prompt": "p"}], SFT_KEYS, "SFT train")
    with pytest.raises(ValueError, match=r"SFT train row 0: completion \(int\) must be strings"):
        records([{"prompt": "p", "completion": 3}], SFT_KEYS, "SFT train")
    with pytest.raises(ValueError, match="SFT train: no rows"):
        records([], SFT_KEYS, "SFT train")


def test_config_kwargs_follow_the_recipe(tmp_path: Path) -> None:
    kwargs = config_kwargs(RESUMABLE.model_copy(update={"eval_every": 3}), tmp_path, seed=5)
    assert kwargs["save_strategy"] == "steps" and kwargs["save_steps"] == 2 and kwargs["save_only_model"] is False
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == 3
    assert (kwargs["seed"], kwargs["data_seed"], kwargs["max_steps"], kwargs["warmup_steps"]) == (5, 5, 6, 0.1)
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False  # "auto" is fp32 on CPU
    assert config_kwargs(SFT.model_copy(update={"precision": "bf16"}), tmp_path, seed=0)["bf16"] is True
    no_checkpoints = config_kwargs(SFT, tmp_path, seed=0)
    assert no_checkpoints["save_strategy"] == "no" and "save_steps" not in no_checkpoints


def test_a_long_run_hands_on_about_twenty_training_lines_and_every_other_line() -> None:
    handed: list[dict] = []
    callback, state = LogCallback(handed.append), TrainerState(max_steps=120)
    for step in range(1, 121):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 1.0})
        if step % 50 == 0:
            callback.on_log(None, state, None, logs={"eval_loss": 2.0})
    callback.on_log(None, state, None, logs={"train_runtime": 3.0})
    assert [line["step"] for line in handed if "loss" in line] == list(range(6, 121, 6))
    assert [line["step"] for line in handed if "eval_loss" in line] == [50, 100]
    assert handed[-1] == {"step": 120, "train_runtime": 3.0}
