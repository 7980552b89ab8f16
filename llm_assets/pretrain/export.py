"""Export a trained model as a Hugging Face model directory (config.json + model.safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


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
        use_tokenizer_special_ids(model, AutoTokenizer.from_pretrained(tokenizer_dir))
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for source in sorted(p for p in tokenizer_dir.iterdir() if p.is_file()):
            if (out_dir / source.name).exists():
                raise FileExistsError(f"{source}: the model export already wrote {out_dir / source.name}")
            shutil.copy2(source, out_dir / source.name)
    return out_dir


def use_tokenizer_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set the model's bos/eos/pad ids (config and generation config) to the tokenizer's.

    A config built from an architecture (LlamaConfig: bos 1, eos 2) carries that architecture's
    default ids rather than our tokenizer's: generation would stop at the wrong token, and a
    sequence classifier would pool at the wrong position (it finds the last token by pad_token_id).
    """
    for config in filter(None, (model.config, getattr(model, "generation_config", None))):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, name, getattr(tokenizer, name))
