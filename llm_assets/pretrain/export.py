"""Export a trained model as a Hugging Face model directory (config.json + model.safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel


def save_hf(model: torch.nn.Module, out_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """Save `model` so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads it unchanged.

    Every file of `tokenizer_dir` (tokenizer.json, tokenizer_config.json, ...) is copied alongside,
    so the directory also serves `AutoTokenizer.from_pretrained(out_dir)`. transformers 5 writes
    safetensors only (its `safe_serialization` argument is gone).
    """
    # A DDP-wrapped model holds the real one in `.module`.
    model = getattr(model, "module", model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_hf needs a transformers PreTrainedModel, got {type(model).__name__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        _use_tokenizer_special_ids(model, tokenizer_dir)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for source in sorted(p for p in tokenizer_dir.iterdir() if p.is_file()):
            if (out_dir / source.name).exists():
                raise FileExistsError(f"{source}: the model export already wrote {out_dir / source.name}")
            shutil.copy2(source, out_dir / source.name)
    return out_dir


def _use_tokenizer_special_ids(model: PreTrainedModel, tokenizer_dir: Path) -> None:
    """LlamaConfig defaults to Llama's own bos/eos ids; ours come from the tokenizer, or generation
    (and trl, lm-eval, a server) would stop on the wrong token."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, model.generation_config):
        if config is not None:
            for name, value in ids.items():
                setattr(config, name, value)
