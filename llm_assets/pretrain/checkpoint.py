"""Training checkpoints: one directory per step, committed atomically, verified on load.

Layout of `<checkpoint_dir>/step_00000100/`:
  model.safetensors  model weights (safetensors: no pickle; a tied LM head is stored once)
  optimizer.pt       optimizer state (torch.save; loaded with weights_only=True)
  trainer.pt         LR-scheduler state and every rank's RNG states (idem)
  state.json         step, data position, config and history, written by the loop
  checkpoint.json    written last: size and sha256 of each file above

A checkpoint is built in a `.tmp-*` directory next to its final place, every file and the
directory are fsynced, and the directory is renamed into place: a reader sees either no
`step_*` directory or a complete one. `checkpoint.json` is the commit marker and its checksums
catch a file truncated or corrupted later; every such problem is a `CheckpointError` naming the
file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from llm_assets.store import fsync_path, hash_file

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, STATE_FILE)
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, corrupted or does not fit the model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]
    rng_states: list[dict[str, Any]]


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step_{step:08d}"


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_states: list[dict[str, Any]],
    state: dict[str, Any],
) -> Path:
    """Write and atomically commit the checkpoint of `step`; return its directory."""
    final = checkpoint_path(checkpoint_dir, step)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=checkpoint_dir))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_states}, tmp / TRAINER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        files = {}
        for name in FILES:
            fsync_path(tmp / name)
            digest, size = hash_file(tmp / name)
            files[name] = {"bytes": size, "sha256": digest}
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
        if final.exists():
            # Only when a resumed run passes a step an earlier run had already saved: the old
            # directory is moved aside first because rename cannot replace a non-empty one.
            stale = Path(tempfile.mkdtemp(prefix=f".tmp-replaced-{final.name}-", dir=checkpoint_dir))
            os.rename(final, stale / final.name)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        fsync_path(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; `CheckpointError` naming the first bad file.

    Without `hashes` only presence and sizes are checked (cheap: what `latest_checkpoint` uses).
    """
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(
            f"{manifest_file}: missing: {path} is not a complete checkpoint (interrupted write or partial copy)"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_file}: unreadable checkpoint manifest: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_file}: checkpoint format {manifest.get('format')!r}, expected {FORMAT_VERSION}"
        )
    for name in FILES:
        file = path / name
        if name not in listed:
            raise CheckpointError(f"{file}: not listed in {manifest_file}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != listed[name]["bytes"]:
            raise CheckpointError(
                f"{file}: truncated or overwritten: {size} bytes, the manifest says {listed[name]['bytes']}"
            )
        if hashes and hash_file(file)[0] != listed[name]["sha256"]:
            raise CheckpointError(f"{file}: corrupted: its sha256 differs from the one in {manifest_file}")
    return manifest


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step under `checkpoint_dir`, if any.

    Temporary (`.tmp-*`) directories are never candidates; a `step_*` directory with a missing or
    truncated file is skipped with a warning (its full checksums are verified on load).
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
        reverse=True,
    )
    for _, path in candidates:
        try:
            verify_checkpoint(path, hashes=False)
        except CheckpointError as exc:
            log.warning("skipping incomplete checkpoint: %s", exc)
            continue
        return path
    return None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> LoadedCheckpoint:
    """Verify `path` and load it into `model` (and `optimizer`, `scheduler` when given).

    RNG states are returned, not applied: which rank takes which state is the loop's business.
    """
    manifest = verify_checkpoint(path)
    device = next(model.parameters()).device
    with _naming(path / MODEL_FILE):
        load_model(model, path / MODEL_FILE, strict=True, device=str(device))
    with _naming(path / TRAINER_FILE):
        trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        with _naming(path / OPTIMIZER_FILE):
            optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True))
    if scheduler is not None:
        with _naming(path / TRAINER_FILE):
            scheduler.load_state_dict(trainer["scheduler"])
    with _naming(path / STATE_FILE):
        state = json.loads((path / STATE_FILE).read_text())
    return LoadedCheckpoint(path=path, step=manifest["step"], state=state, rng_states=trainer["rng"])


def remove_temp_dirs(checkpoint_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of writes that were killed midway (call with no writer running)."""
    for path in checkpoint_dir.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states, as types `torch.load(weights_only=True)` accepts."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_key.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_key.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _naming(file: Path) -> Iterator[None]:
    """Re-raise any failure to read `file` as a CheckpointError that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot load: {type(exc).__name__}: {exc}") from exc
