"""FSDP2: two gloo ranks under torchrun, each holding half of every weight, train what one process
trains, from a single process's checkpoint; their checkpoints and export hold the full weights,
which a single process resumes from.

The DDP counterpart is in test_processes.py, whose spec and environment helpers this reuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_assets.manifest import ManifestError, load_manifest
from llm_assets.pretrain import build_model, load_checkpoint, train, verify_checkpoint
from llm_assets.pretrain.distributed import shard_model
from llm_assets.pretrain.loop import build_optimizer
from llm_assets_tests.pretrain.test_processes import REPO, _env, _spec
from llm_assets_tests.pretrain.tiny import BASE, TINY, losses


@pytest.mark.slow
def test_fsdp_two_ranks_train_what_one_process_trains(corpus, reference, tmp_path: Path) -> None:
    # The two ranks start from the single-process reference's step-20 checkpoint: its weights and
    # optimizer state are sharded onto them, and they train steps 21 to 60.
    cfg = BASE.replace(batch_size=4, parallelism="fsdp")  # 2 ranks × 4: the reference's global batch of 8
    spec_file = _spec(tmp_path, corpus, cfg)
    spec = json.loads(spec_file.read_text()) | {"export_dir": str(tmp_path / "export"),
                                                "resume": str(reference.checkpoint_dir / "step_00000020")}
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "llm_assets.pretrain", "--spec", str(spec_file)],
        cwd=REPO, env=_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumed_from_step"] == 20
    # Sharded sums of gradients run in another order than one process's: close, not equal.
    assert [r["loss"] for r in result["history"]] == pytest.approx(losses(reference.result), rel=1e-5)
    assert result["final_val_loss"] == pytest.approx(reference.result.final_val_loss, rel=1e-5)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]
    reported = [e["metadata"] for e in events if e["event"] == "result"]
    assert len(reported) == 1 and reported[0]["world_size"] == 2

    # The checkpoints hold full tensors (gathered on save), loadable into a plain model; the last
    # one equals the export and, within tolerance, the reference's final weights.
    checkpoint_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step_00000040", "step_00000060"]
    last = checkpoint_dir / "step_00000060"
    verify_checkpoint(last)
    plain = build_model(TINY, seed=123)
    load_checkpoint(last, model=plain)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    reference_weights = reference.model.state_dict()
    assert set(load_file(last / "model.safetensors")) == set(reference_weights)
    for name, weight in plain.state_dict().items():
        assert torch.equal(weight, exported[name]), name
        torch.testing.assert_close(weight, reference_weights[name], rtol=1e-3, atol=1e-4)
    # The optimizer state is the unsharded optimizer's: one full-size entry per parameter, in its order.
    optimizer_state = torch.load(last / "optimizer.pt", weights_only=True)
    ordered = [p for group in build_optimizer(plain, cfg).param_groups for p in group["params"]]
    assert [s["exp_avg"].shape for s in optimizer_state["state"].values()] == [p.shape for p in ordered]

    # One process resumes the FSDP run from its step-40 checkpoint and continues the reference.
    resumed = train(build_model(TINY, seed=5), corpus.train, corpus.val, BASE,
                    resume_from=checkpoint_dir / "step_00000040")
    assert losses(resumed)[40:] == pytest.approx(losses(reference.result)[40:], rel=1e-5)


def test_unknown_parallelism_is_refused_with_the_field_named(manifest_path: Path) -> None:
    manifest = yaml.safe_load(manifest_path.read_text()) | {"compute": {"training": {"parallelism": "zero3"}}}
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match=r"compute\.training\.parallelism") as raised:
        load_manifest(manifest_path)
    assert "'ddp' or 'fsdp'" in str(raised.value)


def test_fsdp_refuses_a_model_without_decoder_layers_to_shard() -> None:
    # Sharding only the root would all-gather every weight at once: no memory saved, so it is an error.
    model = build_model(TINY, seed=0)
    model._no_split_modules = None
    with pytest.raises(ValueError, match="names no decoder layer class.*use parallelism ddp"):
        shard_model(model)
