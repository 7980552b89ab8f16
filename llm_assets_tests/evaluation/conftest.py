"""Fixtures: a small held-out frame shaped like dataset_splits' test.parquet, tiny Llama
directories as the export writes them (untrained, trained on that frame, trained to refuse), a
packed token shard of the training texts, and eval_report's inputs recorded on an instance."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from llm_assets.evaluation.safety import RED_TEAM_FILE, load_prompts
from llm_assets.hf_models import save_hf
from llm_assets.manifest import ModelSize, TokenizerRecipe
from llm_assets.posttrain.derived import derive_sft_examples
from llm_assets.pretrain import TokenData, TrainConfig, build_model, train
from llm_assets.prompts import render_prompt
from llm_assets.tokenizer.bpe import save_hf_tokenizer as save_tokenizer
from llm_assets.tokenizer.bpe import train_bpe
from llm_assets.tokenizer.packing import pack_documents

TINY = ModelSize(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=320, max_seq_len=128)
# About a second on 2 cores; enough for the tiny model to learn a dozen short documents.
STEPS = TrainConfig(steps=60, batch_size=8, seq_len=64, learning_rate=1e-2, warmup_steps=5)
REFUSAL = "I'm sorry, I can't help with that."

DOCSTRINGS = {
    "Cube.volume": "Return the volume of the cube.\n\nThe edge length is cubed.",
    "Cube.area": "Return the surface area of the cube.",
    "Ball.volume": "Return the volume of the ball, four thirds of pi times the radius cubed.",
    "Ball.roll": "Roll the ball by the given distance.\n\nArgs:\n    distance: how far to roll.",
    "Cone.height": "Return the height of the cone from its base to its tip.",
    "Cone.slant": "Return the slant length of the cone.",
    "Ring.inner": "Return the inner radius of the ring.",
    "Ring.outer": "Return the outer radius of the ring, always larger than the inner one.",
    "Star.points": "Return how many points the star has.",
    "Star.rotate": "Turn the star about its centre by an angle in degrees.",
    "Disc.flip": "Flip the disc over so that its other face is up.",
    "<module>": "Shapes of many kinds and the measures of each one.\n\nEvery shape is immutable.",
}
CODE = {
    "solid.py": "class Cube:\n    def volume(self):\n        return self.edge ** 3\n",
    "round.py": "class Ball:\n    def roll(self, distance):\n        self.position += distance\n",
    "flat.py": "class Disc:\n    def flip(self):\n        self.face = not self.face\n",
    "star.py": "class Star:\n    def rotate(self, angle):\n        self.angle = (self.angle + angle) % 360\n",
}


def _row(doc_id: str, text: str, kind: str) -> dict[str, str]:
    return {"id": doc_id, "text": text, "source": "stdlib", "uri": f"file:///{doc_id}", "kind": kind,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def heldout_rows() -> list[dict[str, str]]:
    docs = [_row(f"stdlib:shapes/__init__.py::{name}" if name == "<module>" else f"stdlib:shapes/solid.py::{name}",
                 text, "docstring") for name, text in DOCSTRINGS.items()]
    return docs + [_row(f"stdlib:shapes/{path}", text, "code") for path, text in CODE.items()]


@pytest.fixture(scope="session")
def heldout() -> pl.DataFrame:
    return pl.DataFrame(heldout_rows())


@pytest.fixture(scope="session")
def tokenizer_dir(heldout: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    recipe = TokenizerRecipe(vocab_size=TINY.vocab_size)
    texts = heldout["text"].to_list() + _chats(heldout) + [render_prompt([{"role": "user", "content": p}]) + REFUSAL
                                                            for p in load_prompts(RED_TEAM_FILE)]
    save_tokenizer(train_bpe(texts * 4, recipe), recipe, out)
    return out


def _chats(frame: pl.DataFrame) -> list[str]:
    """The docstrings' questions and answers in the prompt format: what the question tasks ask."""
    return [row["prompt"] + row["completion"] for row in derive_sft_examples(frame, 200).iter_rows(named=True)]


def _export(tokenizer_dir: Path, out_dir: Path, documents: Sequence[str]) -> Path:
    """The tiny model, trained on `documents` (each closed by EOS) unless there are none."""
    model = build_model(TINY, seed=0)
    if documents:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = [t for doc in documents for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
        train(model, TokenData(np.array(ids)), None, STEPS)
    return save_hf(model, out_dir, tokenizer_dir)


@pytest.fixture(scope="session")
def untrained_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tokenizer_dir, tmp_path_factory.mktemp("untrained") / "model", [])


@pytest.fixture(scope="session")
def trained_dir(tokenizer_dir: Path, heldout: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tokenizer_dir, tmp_path_factory.mktemp("trained") / "model",
                   heldout["text"].to_list() + _chats(heldout))


@pytest.fixture(scope="session")
def refusing_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that has only ever seen the red-team prompts answered with a refusal."""
    chats = [render_prompt([{"role": "user", "content": p}]) + REFUSAL for p in load_prompts(RED_TEAM_FILE)]
    return _export(tokenizer_dir, tmp_path_factory.mktemp("refusing") / "model", chats)


@pytest.fixture(scope="session")
def shard_dir(tokenizer_dir: Path, heldout: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed training shard of what `trained_dir` learned (the texts and their chats)."""
    out = tmp_path_factory.mktemp("token_shard")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id(TokenizerRecipe(vocab_size=TINY.vocab_size).eos_token)
    pack_documents(tokenizer, heldout["text"].to_list() + _chats(heldout), out, eos_id=eos, batch_size=64)
    return out


def record_eval_inputs(defs: dg.Definitions, instance: dg.DagsterInstance, store, model_dir: Path,
                       heldout: pl.DataFrame, tokenizer_dir: Path, shard_dir: Path, scratch: Path) -> str:
    """Record every input of eval_report[xs] as materialized: `model_dir` as the pretrained
    checkpoint, `heldout` as the test split, `shard_dir` as the token shard of every corpus shard
    the manifest's sources offer (registered as a run registers them). Returns the model's hash."""
    from llm_assets.runner import register_shards
    from llm_assets_tests.quantize.test_assets import record  # that module imports this one's fixtures

    splits = scratch / "splits"
    splits.mkdir()
    heldout.write_parquet(splits / "test.parquet")
    register_shards(defs, instance, log=lambda _: None)
    for shard in instance.get_dynamic_partitions("corpus_shards"):
        record(instance, store, "token_shards", shard, shard_dir, "packed_tokens")
    record(instance, store, "tokenizer", None, tokenizer_dir, "tokenizer")
    record(instance, store, "dataset_splits", None, splits, "dataset_splits")
    return record(instance, store, "pretrain_checkpoint", "xs", model_dir, "hf_model")
