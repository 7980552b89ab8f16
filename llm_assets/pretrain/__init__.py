"""Pretraining in plain torch: a loop to read top to bottom, atomic resumable checkpoints, DDP.

    model = build_model(size, seed=cfg.seed)
    result = train(model, TokenData.from_bin_files(train_bins, "uint16"), val, cfg,
                   checkpoint_dir=ckpts, resume_from=latest_checkpoint(ckpts))
    save_hf(model, out_dir, tokenizer_dir)  # llm_assets.hf_models

Multi-process: `torchrun --nproc_per_node=N -m llm_assets.pretrain --spec run.json`.
"""

from llm_assets.pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, verify_checkpoint
from llm_assets.pretrain.data import TokenBatches, TokenData
from llm_assets.pretrain.distributed import DistInfo, maybe_init_distributed
from llm_assets.pretrain.loop import StepRecord, TrainConfig, TrainResult, lr_at, resolve_precision, train
from llm_assets.pretrain.model import build_model, count_parameters, flops_per_token, llama_config

__all__ = [
    "CheckpointError", "DistInfo", "StepRecord", "TokenBatches", "TokenData", "TrainConfig", "TrainResult",
    "build_model", "count_parameters", "flops_per_token", "latest_checkpoint", "llama_config", "load_checkpoint",
    "lr_at", "maybe_init_distributed", "resolve_precision", "train", "verify_checkpoint",
]
