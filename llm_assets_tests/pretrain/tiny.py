"""A tiny Llama and a corpus it can learn: walks on a sparse Markov chain over 256 tokens.

Every token has 4 possible successors, so the best achievable loss is ln 4 ≈ 1.39 nats, against
ln 256 ≈ 5.55 for an untrained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llm_assets.manifest import ModelSize
from llm_assets.pretrain import TokenData, TrainConfig, TrainResult

VOCAB = 256
UNIFORM_LOSS = math.log(VOCAB)
TINY = ModelSize(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=VOCAB, max_seq_len=64)
# 60 steps of 8 × 32 tokens: about a second on 2 CPU cores.
BASE = TrainConfig(steps=60, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=5, min_lr_ratio=0.1,
                   eval_every=20, eval_batches=4, checkpoint_every=20, seed=0)


def markov_tokens(n: int, *, walk_seed: int, branching: int = 4) -> np.ndarray:
    """n tokens of a random walk on a fixed chain (the chain is the same for every walk_seed)."""
    successors = np.random.default_rng(1234).integers(0, VOCAB, size=(VOCAB, branching))
    choices = np.random.default_rng(walk_seed).integers(0, branching, size=n)
    tokens = np.empty(n, dtype=np.uint16)
    token = 0
    for i in range(n):
        tokens[i] = token
        token = successors[token, choices[i]]
    return tokens


@dataclass(frozen=True)
class Corpus:
    train_arrays: list[np.ndarray]
    val_array: np.ndarray

    @property
    def train(self) -> TokenData:
        return TokenData(self.train_arrays)

    @property
    def val(self) -> TokenData:
        return TokenData(self.val_array)


def losses(result: TrainResult) -> list[float]:
    return [r.loss for r in result.history]
