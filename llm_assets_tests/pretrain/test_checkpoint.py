"""Checkpoints: committed atomically, complete or ignored, and loud about any damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llm_assets.manifest import ModelSize
from llm_assets.pretrain import (
    CheckpointError,
    build_model,
    latest_checkpoint,
    load_checkpoint,
    train,
    verify_checkpoint,
)
from llm_assets.pretrain import checkpoint as checkpoint_module
from llm_assets_tests.pretrain.tiny import BASE, TINY

FILES = {"checkpoint.json", "model.safetensors", "optimizer.pt", "trainer.pt", "state.json"}


def test_layout_and_callbacks(reference) -> None:
    names = sorted(p.name for p in reference.checkpoint_dir.iterdir())
    assert names == ["step_00000020", "step_00000040", "step_00000060"]  # no temp dirs left behind
    assert [(p.name, step) for p, step in reference.committed] == [(n, int(n[5:])) for n in names]
    assert reference.result.checkpoints == [p for p, _ in reference.committed]
    step_40 = reference.checkpoint_dir / "step_00000040"
    assert {p.name for p in step_40.iterdir()} == FILES
    state = json.loads((step_40 / "state.json").read_text())
    assert state["step"] == state["data"]["position"] == 40 and len(state["history"]) == 40
    assert state["config"]["learning_rate"] == BASE.learning_rate
    trainer = torch.load(step_40 / "trainer.pt", weights_only=True)
    assert trainer["scheduler"]["last_epoch"] == 40 and len(trainer["rng"]) == 1
    assert latest_checkpoint(reference.checkpoint_dir) == reference.checkpoint_dir / "step_00000060"
    assert latest_checkpoint(reference.checkpoint_dir / "nothing-here") is None


@pytest.fixture
def ckpt(reference, tmp_path: Path) -> Path:
    """A copy of the step-20 checkpoint, free to damage."""
    return Path(shutil.copytree(reference.checkpoint_dir / "step_00000020", tmp_path / "run" / "step_00000020"))


def _load(path: Path) -> None:
    load_checkpoint(path, model=build_model(TINY, seed=0))


def test_flipped_bytes_in_the_weights_are_caught_naming_the_file(ckpt: Path, corpus) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: safetensors itself would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted"):
        _load(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted"):
        train(build_model(TINY, seed=0), corpus.train, None, BASE, resume_from=ckpt)
    verify_checkpoint(ckpt, hashes=False)  # same size: only the checksum can tell


def test_a_deleted_or_truncated_file_is_caught_naming_the_file(ckpt: Path) -> None:
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: missing"):
        _load(ckpt)
    assert latest_checkpoint(ckpt.parent) is None  # an incomplete checkpoint is never the latest
    (ckpt / "optimizer.pt").write_bytes(b"a short file")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: truncated"):
        _load(ckpt)
    (ckpt / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: missing"):
        _load(ckpt)


def test_weights_of_another_architecture_fail_naming_the_file(ckpt: Path) -> None:
    wider = ModelSize(**(TINY.model_dump() | {"hidden_size": 32, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot load"):
        load_checkpoint(ckpt, model=build_model(wider, seed=0))


def test_partial_directories_are_never_the_latest(reference, tmp_path: Path) -> None:
    run = Path(shutil.copytree(reference.checkpoint_dir, tmp_path / "run"))
    # What a writer killed midway leaves: a temp dir (any content), or a step dir with no manifest.
    shutil.copytree(run / "step_00000060", run / ".tmp-step_00000080-abc")
    (run / "step_00000100").mkdir()
    (run / "step_00000100" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(run) == run / "step_00000060"


def test_a_failed_write_leaves_nothing_behind(corpus, tmp_path: Path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(build_model(TINY, seed=0), corpus.train, None, BASE.replace(steps=2, warmup_steps=1),
              checkpoint_dir=tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


def test_a_tied_model_round_trips(corpus, tmp_path: Path) -> None:
    tied = TINY.model_copy(update={"tie_embeddings": True})
    cfg = BASE.replace(steps=3, warmup_steps=1)
    model = build_model(tied, seed=0)
    result = train(model, corpus.train, None, cfg, checkpoint_dir=tmp_path / "run")
    restored = build_model(tied, seed=1)
    load_checkpoint(result.checkpoints[-1], model=restored)
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
