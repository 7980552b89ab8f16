"""Real processes: a run killed with SIGKILL resumes where its last checkpoint left it, and two DDP
ranks under torchrun train exactly what one process trains.

Both start `python -m llm_assets.pretrain` (the command-line entry point) with a JSON spec.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_assets.pretrain import TrainConfig, build_model, latest_checkpoint, train, verify_checkpoint
from llm_assets_tests.pretrain.tiny import BASE, TINY, Corpus, losses

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, corpus: Corpus, cfg: TrainConfig) -> Path:
    for i, array in enumerate(corpus.train_arrays):
        array.tofile(tmp_path / f"train-{i}.bin")
    corpus.val_array.tofile(tmp_path / "val.bin")
    spec = {
        "model": TINY.model_dump(),
        "train": cfg.model_dump(mode="json"),
        "train_bins": [str(tmp_path / f"train-{i}.bin") for i in range(len(corpus.train_arrays))],
        "val_bins": [str(tmp_path / "val.bin")],
        "token_dtype": "uint16",
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "resume": "latest",
        "result": str(tmp_path / "result.json"),
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _env() -> dict[str, str]:
    # The same thread count as this process, so that the numerics match the in-process reference.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def test_sigkill_mid_run_then_resume_from_the_latest_checkpoint(corpus, reference, tmp_path: Path) -> None:
    cfg = BASE.replace(checkpoint_every=5)
    spec = _spec(tmp_path, corpus, cfg)
    checkpoint_dir = tmp_path / "checkpoints"
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "llm_assets.pretrain", "--spec", str(spec)], cwd=REPO,
                                env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            for line in proc.stdout:
                # Kill as soon as the step-10 checkpoint is committed: 50 steps are still to go.
                event = json.loads(line)
                if event["event"] == "checkpoint" and event["step"] >= 10:
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.log").read_text()[-3000:]

    latest = latest_checkpoint(checkpoint_dir)
    assert latest is not None and 10 <= _step(latest) < cfg.steps, latest
    # Whatever the kill interrupted is either a complete step dir or an ignored temp dir.
    for path in checkpoint_dir.iterdir():
        if path.name.startswith("step_"):
            verify_checkpoint(path)
        else:
            assert path.name.startswith(".tmp-"), path

    resumed = train(build_model(TINY, seed=99), corpus.train, corpus.val, cfg, checkpoint_dir=checkpoint_dir,
                    resume_from=latest)
    assert resumed.resumed_from_step == _step(latest) and resumed.steps_done == cfg.steps
    assert [r.step for r in resumed.history] == list(range(1, cfg.steps + 1))
    # Steps before the kill ran in the subprocess, the rest here, as in one uninterrupted run.
    assert losses(resumed) == pytest.approx(losses(reference.result), rel=1e-6)
    assert resumed.final_train_loss == pytest.approx(reference.result.final_train_loss, rel=1e-6)
    assert resumed.final_val_loss == pytest.approx(reference.result.final_val_loss, rel=1e-6)
    assert latest_checkpoint(checkpoint_dir) == checkpoint_dir / "step_00000060"
    assert not list(checkpoint_dir.glob(".tmp-*"))


def test_ddp_two_ranks_train_what_one_process_trains(corpus, reference, tmp_path: Path) -> None:
    cfg = BASE.replace(batch_size=4)  # 2 ranks × 4: the reference's global batch of 8
    spec = _spec(tmp_path, corpus, cfg)
    checkpoint_dir = tmp_path / "checkpoints"
    env = _env() | {"OMP_NUM_THREADS": "1"}  # two ranks on two cores
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "llm_assets.pretrain", "--spec", str(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    # The sums of gradients and losses run in another order over ranks and threads: close, not equal.
    assert [r["loss"] for r in result["history"]] == pytest.approx(losses(reference.result), rel=1e-5)
    assert result["final_val_loss"] == pytest.approx(reference.result.final_val_loss, rel=1e-5)
    assert result["tokens_seen"] == reference.result.tokens_seen

    # Only rank 0 commits checkpoints and reports: one line per checkpoint and one result, not one per rank.
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [20, 40, 60]
    reported = [e["metadata"] for e in events if e["event"] == "result"]
    assert len(reported) == 1 and reported[0]["world_size"] == 2 and reported[0]["steps"] == 60
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step_00000020", "step_00000040", "step_00000060"]
    state = json.loads((checkpoint_dir / "step_00000020" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["global_batch"] == 8
    assert len(torch.load(checkpoint_dir / "step_00000020" / "trainer.pt", weights_only=True)["rng"]) == 2

    # The same global batch in one process continues the 2-rank run.
    resumed = train(build_model(TINY, seed=5), corpus.train, corpus.val, BASE,
                    resume_from=checkpoint_dir / "step_00000020")
    assert losses(resumed)[20:] == pytest.approx(losses(reference.result)[20:], rel=1e-5)
