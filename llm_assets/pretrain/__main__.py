"""Command line: one training run described by a JSON spec; also the torchrun entry point.

    python -m llm_assets.pretrain --spec run.json
    torchrun --nproc_per_node=8 -m llm_assets.pretrain --spec run.json

The spec: {"model": {ModelSize fields}, "train": {TrainConfig fields},
           "train_bins": [paths], "val_bins": [paths], "token_dtype": "uint16" | "uint32",
           "checkpoint_dir": path, "resume": "latest" | checkpoint path | null,
           "result": path of a JSON TrainResult to write | null, "export_dir": path | null,
           "tokenizer_dir": path | null}
Rank 0 prints one JSON line per committed checkpoint: {"event": "checkpoint", "step", "path"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch.distributed

from llm_assets.manifest import ModelSize
from llm_assets.pretrain.checkpoint import latest_checkpoint
from llm_assets.pretrain.data import TokenData
from llm_assets.pretrain.distributed import maybe_init_distributed
from llm_assets.pretrain.export import save_hf
from llm_assets.pretrain.loop import TrainConfig, train
from llm_assets.pretrain.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_assets.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON run spec")
    spec = json.loads(parser.parse_args().spec.read_text())

    dist = maybe_init_distributed()
    cfg = TrainConfig.from_dict(spec["train"])
    model = build_model(ModelSize(**spec["model"]), seed=cfg.seed).to(dist.device)
    train_data = TokenData.from_bin_files(spec["train_bins"], spec["token_dtype"])
    val_data = TokenData.from_bin_files(spec["val_bins"], spec["token_dtype"]) if spec.get("val_bins") else None
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None
    resume = spec.get("resume")
    resume_from = latest_checkpoint(checkpoint_dir) if resume == "latest" and checkpoint_dir else (
        Path(resume) if resume and resume != "latest" else None)

    def announce(path: Path, step: int) -> None:
        print(json.dumps({"event": "checkpoint", "step": step, "path": str(path)}), flush=True)

    try:
        result = train(model, train_data, val_data, cfg, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
                       on_checkpoint=announce)
        if dist.is_main and spec.get("result"):
            Path(spec["result"]).write_text(json.dumps(dataclasses.asdict(result), default=str, indent=1))
        if dist.is_main and spec.get("export_dir"):
            tokenizer_dir = Path(spec["tokenizer_dir"]) if spec.get("tokenizer_dir") else None
            save_hf(model, Path(spec["export_dir"]), tokenizer_dir)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
