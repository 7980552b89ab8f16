"""Pretraining in plain torch: a loop to read top to bottom, atomic resumable checkpoints, DDP.

    model = build_model(size, seed=cfg.seed)
    result = train(model, TokenData.from_bin_files(train_bins, "uint16"), val, cfg,
                   checkpoint_dir=ckpts, resume_from=latest_checkpoint(ckpts))
    save_hf(model, out_dir, tokenizer_dir)  # llm_assets.hf_models

Multi-process: `torchrun --nproc_per_node=N -m llm_assets.pretrain --spec run.json`.
"""

from llm_assets.lazy import lazy_exports

# Imported on first use: the package's assets module is part of the definitions, which load
# without torch; these modules need it.
_EXPORTS = {
    **dict.fromkeys(["CheckpointError", "latest_checkpoint", "load_checkpoint", "verify_checkpoint"], "checkpoint"),
    **dict.fromkeys(["TokenBatches", "TokenData"], "data"),
    **dict.fromkeys(["DistInfo", "maybe_init_distributed"], "distributed"),
    **dict.fromkeys(["StepRecord", "TrainConfig", "TrainResult", "lr_at", "resolve_precision", "train"], "loop"),
    **dict.fromkeys(["build_model", "count_parameters", "flops_per_token", "llama_config"], "model"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
