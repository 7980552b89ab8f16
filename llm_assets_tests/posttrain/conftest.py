"""Fixtures: a tiny pretrained model directory, and the SFT and reward models trained from it once
per session (the later stages start from them, as in the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from llm_assets.hf_models import save_hf
from llm_assets.manifest import ModelSize, RewardRecipe, SftRecipe, TokenizerRecipe
from llm_assets.posttrain.reward import RewardResult, run_reward
from llm_assets.posttrain.sft import SftResult, run_sft
from llm_assets.pretrain import TokenData, TrainConfig, build_model, train
from llm_assets.tokenizer.bpe import save_hf_tokenizer as save_tokenizer
from llm_assets.tokenizer.bpe import train_bpe
from llm_assets_tests.posttrain import synthetic

TINY = ModelSize(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=320, max_seq_len=128)
# Learning rates that make these tiny models learn in a few dozen steps (trl's defaults, 2e-5 for
# SFT and 1e-6 for DPO, barely move them).
SFT = SftRecipe(steps=30, batch_size=16, learning_rate=3e-3, eval_every=15, checkpoint_every=0)
REWARD = RewardRecipe(steps=30, batch_size=8, learning_rate=3e-3, checkpoint_every=0)


@dataclass(frozen=True)
class Trained:
    out_dir: Path
    result: SftResult | RewardResult


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 320 tokens and a 2-layer Llama pretrained for 40 steps on the task's
    statements (not its Q/A format), saved as the pretrain stage exports it."""
    root = tmp_path_factory.mktemp("base")
    recipe = TokenizerRecipe(vocab_size=TINY.vocab_size)
    statements = synthetic.pretrain_text()
    chats = [row["prompt"] + row["completion"] for row in synthetic.sft_rows(held_out=False)]
    tokenizer = save_tokenizer(train_bpe((statements + chats) * 4, recipe), recipe, root / "tokenizer")
    documents = np.random.default_rng(0).choice(statements, size=3000)
    tokens = np.array([t for doc in documents for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]])
    model = build_model(TINY, seed=0)
    train(model, TokenData(tokens), None, TrainConfig(steps=40, batch_size=8, seq_len=64, learning_rate=1e-2,
                                                      warmup_steps=4))
    return save_hf(model, root / "model", root / "tokenizer")


@pytest.fixture(scope="session")
def sft(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("sft")
    result = run_sft(base_dir, synthetic.sft_rows(held_out=False), synthetic.sft_rows(held_out=True), SFT,
                     root / "model", root / "work", seed=0)
    return Trained(root / "model", result)


@pytest.fixture(scope="session")
def reward(sft: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("reward")
    result = run_reward(sft.out_dir, synthetic.preference_rows(held_out=False),
                        synthetic.preference_rows(held_out=True), REWARD, root / "model", root / "work", seed=0)
    return Trained(root / "model", result)
