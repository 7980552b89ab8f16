"""Supervised fine-tuning with trl's SFTTrainer: full fine-tuning or LoRA merged into the weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from llm_assets.hf_models import export_model, load_model, load_tokenizer
from llm_assets.manifest import SftRecipe
from llm_assets.posttrain.common import OnCheckpoint, OnLog, TrainingRun, callbacks, config_kwargs, run_trainer
from llm_assets.posttrain.lora import lora_config, parameter_count, save_adapter, sft_method
from llm_assets.posttrain.rows import SFT_KEYS, Rows, in_template, records
from llm_assets.posttrain.scoring import completion_loss
from llm_assets.tracing import phase


@dataclass(frozen=True, kw_only=True)
class SftResult:
    training: TrainingRun
    # scoring.completion_loss on the val rows: nats per completion token (eos included), whatever
    # completion_only_loss trained on
    val_loss: float
    base_val_loss: float  # the base model's, on the same rows, computed the same way
    val_rows: int
    method: Literal["full", "lora"]  # what recipe.method resolved to for this starting model
    parameters: int  # the starting model's
    trainable_parameters: int  # all of them (full), or the adapters' (lora)
    adapter_dir: Path | None  # lora: the trained adapters (lora.save_adapter), under work_dir
    wall_seconds: float  # the whole call: loading, training, figures and export


def run_sft(base_dir: Path, train_rows: Rows, val_rows: Rows, recipe: SftRecipe, out_dir: Path, work_dir: Path, *,
            seed: int, resume_from: Path | None = None, on_checkpoint: OnCheckpoint | None = None,
            on_log: OnLog | None = None) -> SftResult:
    """Fine-tune the causal LM in `base_dir` on prompt/completion rows; export it to `out_dir`.

    `out_dir` gets a plain HF causal LM directory (LoRA adapters merged in) with the tokenizer; with
    LoRA (recipe.method, `lora.sft_method`) the adapters alone go to `work_dir/adapter` too.
    Checkpoints go to `work_dir` (see `common.run_trainer` for `resume_from`, `on_checkpoint`, `on_log`).
    """
    started = time.perf_counter()
    train_records = records(train_rows, SFT_KEYS, "SFT train")
    val_records = records(val_rows, SFT_KEYS, "SFT val")
    with phase("load"):
        tokenizer = load_tokenizer(base_dir)
        train_records, val_records = in_template(train_records, tokenizer, "SFT train"), in_template(
            val_records, tokenizer, "SFT val")
        model = load_model(AutoModelForCausalLM, base_dir, tokenizer)
    base_val_loss = completion_loss(model, tokenizer, val_records, max_length=recipe.max_length,
                                    batch_size=recipe.batch_size)
    parameters = parameter_count(model)
    method = sft_method(recipe, parameters)

    config = SFTConfig(**config_kwargs(recipe, work_dir, seed=seed), max_length=recipe.max_length,
                       completion_only_loss=recipe.completion_only_loss)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_records),
        eval_dataset=Dataset.from_list(val_records) if recipe.eval_every else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora) if method == "lora" else None,
        callbacks=callbacks(on_checkpoint, on_log),
    )
    run = run_trainer(trainer, recipe, resume_from)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # Under torchrun every rank holds the same trained weights; rank 0 alone writes them.
    writes = trainer.is_world_process_zero()
    adapter_dir = work_dir / "adapter" if method == "lora" else None
    if adapter_dir is not None and writes:
        save_adapter(trainer.model, adapter_dir)
    trained = trainer.model.merge_and_unload() if method == "lora" else trainer.model
    val_loss = completion_loss(trained, tokenizer, val_records, max_length=recipe.max_length,
                               batch_size=recipe.batch_size)
    if writes:
        export_model(trained, tokenizer, out_dir)
    return SftResult(training=run, val_loss=val_loss, base_val_loss=base_val_loss, val_rows=len(val_records),
                     method=method, parameters=parameters, trainable_parameters=trainable, adapter_dir=adapter_dir,
                     wall_seconds=time.perf_counter() - started)
