"""Fixtures: the tiny corpus, and one uninterrupted reference run (session-scoped) that the resume,
SIGKILL, gradient-accumulation and DDP tests compare against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llm_assets.pretrain import TrainResult, build_model, train, verify_checkpoint
from llm_assets_tests.pretrain.tiny import BASE, TINY, Corpus, markov_tokens


@dataclass(frozen=True)
class Reference:
    result: TrainResult
    model: torch.nn.Module
    checkpoint_dir: Path
    committed: list[tuple[Path, int]]


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    # Two train shards, as the pipeline writes them; the val walk is drawn independently.
    tokens = markov_tokens(100_000, walk_seed=1)
    return Corpus(train_arrays=[tokens[:60_000], tokens[60_000:]], val_array=markov_tokens(20_000, walk_seed=2))


@pytest.fixture(scope="session")
def reference(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    checkpoint_dir = tmp_path_factory.mktemp("reference") / "checkpoints"
    committed: list[tuple[Path, int]] = []

    def on_checkpoint(path: Path, step: int) -> None:
        verify_checkpoint(path)  # committed and complete by the time the callback runs
        committed.append((path, step))

    model = build_model(TINY, seed=BASE.seed)
    result = train(model, corpus.train, corpus.val, BASE, checkpoint_dir=checkpoint_dir, on_checkpoint=on_checkpoint)
    return Reference(result=result, model=model, checkpoint_dir=checkpoint_dir, committed=committed)
