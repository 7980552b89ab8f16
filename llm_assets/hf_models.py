"""Hugging Face model directories: the device models run on, loading a model and its tokenizer,
and saving a model so that transformers, trl, lm-eval, gptqmodel and vLLM load it as it is.

Pretraining, post-training, evaluation, quantization and serving all read and write models
through this module. It imports no Dagster: the training and quantization workers use it too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def training_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory; it must have an eos token (it ends every completion).

    One without a pad token (many base models define none) pads with its eos, as trl's trainers
    do themselves; padding is masked out, and the exported model's tokenizer keeps that pad token,
    so every later stage and the server pad alike.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer in {model_dir} has no eos_token: post-training needs one (it ends every "
                         "completion, and pads when there is no pad_token); set it in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(auto_class: type, model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """`auto_class.from_pretrained(model_dir)` in fp32 on the training device, its special-token ids
    set from `tokenizer`."""
    model = auto_class.from_pretrained(model_dir, dtype=torch.float32)
    use_tokenizer_special_ids(model, tokenizer)
    return model.to(training_device())


def load_causal_lm(model_dir: Path, what: str) -> Any:
    """A causal LM directory as transformers loads it (fp32, CPU), or an error naming the directory
    and `what` it was meant to be."""
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    except Exception as exc:
        raise RuntimeError(f"{model_dir}: transformers cannot load the {what} ({type(exc).__name__}: {exc}); "
                           "if it is an artifact, `llm-assets verify` checks its files, and rematerializing "
                           "its asset rebuilds it") from exc


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


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """A model and the tokenizer object it was trained with, as an HF model directory: config.json,
    model.safetensors and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
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
