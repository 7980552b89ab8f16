"""LoRA (peft) for SFT: when a starting model gets adapters instead of full fine-tuning, and the
adapter artifact kept beside the merged model.

`method: auto` (the default) trains LoRA adapters on a starting model of at least
`lora.min_parameters` parameters — a 7B base model's full fine-tuning needs its optimizer state
(about 16 bytes per parameter) on the GPUs — and fine-tunes smaller models fully. The adapters are
merged into the weights for everything downstream (export, evaluation, quantization, serving load
a plain causal LM); the adapter itself is stored as its own artifact, whose `lora.json` records the
hash of the starting model it applies to and of the merged model it gave.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel

from llm_assets.manifest import LoraSpec, SftRecipe
from llm_assets.store import ArtifactStore
from llm_assets.store.objects import ArtifactManifest

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LINEAGE_FILE = "lora.json"


def sft_method(recipe: SftRecipe, parameters: int) -> Literal["full", "lora"]:
    """The method SFT uses on a starting model of `parameters` parameters."""
    if recipe.method != "auto":
        return recipe.method
    return "lora" if parameters >= recipe.lora.min_parameters else "full"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_config(spec: LoraSpec) -> LoraConfig:
    # A list is copied: peft keeps it as a set it may change.
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def save_adapter(model: PeftModel, out_dir: Path) -> Path:
    """The trained adapters only (adapter_config.json, adapter_model.safetensors), without peft's
    model card and without the machine path of the starting model, so that the same training gives
    the same bytes wherever it ran; the starting model is named by hash in `lora.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in out_dir.iterdir():
        if path.name not in ADAPTER_FILES:
            path.unlink()
    return out_dir


def store_adapter(store: ArtifactStore, adapter_dir: Path, starting_model_sha256: str,
                  merged_model_dir: Path) -> dict[str, str]:
    """Commit the adapters as their own artifact, with `lora.json`: the starting model's hash and the
    hash the merged model directory gets in the store (the canonical manifest hash of its files,
    computed before it is committed). Returns the metadata that records both with the merged model."""
    merged = ArtifactManifest.of_directory(merged_model_dir).sha256
    (adapter_dir / LINEAGE_FILE).write_text(json.dumps(
        {"starting_model_sha256": starting_model_sha256, "merged_model_sha256": merged}, indent=2, sort_keys=True)
        + "\n")
    ref = store.put_dir(adapter_dir)
    return {"adapter_sha256": ref.sha256, "adapter_uri": ref.uri, "merged_model_sha256": merged}
