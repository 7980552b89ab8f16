"""LoRA is SFT's default above a parameter threshold: on a Qwen2 base model (not the project's
architecture) the adapters alone are kept, they rebuild the exported merged model, and the
adapter artifact names the merged model's hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from llm_assets.manifest import LoraSpec, SftRecipe
from llm_assets.posttrain.lora import ADAPTER_FILES, LINEAGE_FILE, sft_method, store_adapter
from llm_assets.posttrain.sft import run_sft
from llm_assets.prompts import render_prompt
from llm_assets.store import open_store
from llm_assets_tests.base_model.test_import import save_tokenizer
from llm_assets_tests.posttrain import synthetic


def _in_project_format(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The synthetic rows' question as a user turn of the project's format (which in_template reads)."""
    question = lambda prompt: prompt.removeprefix("### User:\n").split("\n### Assistant:", 1)[0]  # noqa: E731
    return [{**row, "prompt": render_prompt([{"role": "user", "content": question(row["prompt"])}])} for row in rows]


TRAIN = _in_project_format(synthetic.sft_rows(held_out=False))
VAL = _in_project_format(synthetic.sft_rows(held_out=True))
RECIPE = SftRecipe(steps=4, batch_size=8, learning_rate=1e-2, max_length=128, checkpoint_every=0,
                   lora=LoraSpec(r=4, alpha=8, min_parameters=10_000))


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("qwen") / "base"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(model_dir)
    save_tokenizer(model_dir)
    return model_dir


def test_auto_trains_lora_from_the_threshold_up() -> None:
    auto = SftRecipe(steps=1, learning_rate=1e-3, lora=LoraSpec(min_parameters=1e9))
    assert (sft_method(auto, 999_999_999), sft_method(auto, 1_000_000_000)) == ("full", "lora")
    assert sft_method(auto.model_copy(update={"method": "full"}), 7 * 10**9) == "full"
    assert sft_method(auto.model_copy(update={"method": "lora"}), 10) == "lora"


def test_lora_adapter_is_stored_and_rebuilds_the_merged_model(qwen_base: Path, tmp_path: Path) -> None:
    result = run_sft(qwen_base, TRAIN, VAL, RECIPE, tmp_path / "merged", tmp_path / "work", seed=0)
    assert result.method == "lora" and result.adapter_dir is not None
    assert 0 < result.trainable_parameters < result.parameters / 2
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == sorted(ADAPTER_FILES)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] is None

    # The stored adapters on the starting model give exactly the exported merged weights.
    rebuilt = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(qwen_base), result.adapter_dir)
    rebuilt = rebuilt.merge_and_unload().state_dict()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.allclose(rebuilt[name], merged[name], atol=1e-6) for name in merged)
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"],
                           load_file(qwen_base / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])

    store = open_store(str(tmp_path / "store"))
    recorded = store_adapter(store, result.adapter_dir, "0" * 64, tmp_path / "merged")
    assert recorded["merged_model_sha256"] == store.put_dir(tmp_path / "merged").sha256
    lineage = json.loads(store.read_bytes(recorded["adapter_sha256"], LINEAGE_FILE))
    assert lineage == {"starting_model_sha256": "0" * 64, "merged_model_sha256": recorded["merged_model_sha256"]}


def test_below_the_threshold_auto_fine_tunes_every_weight(qwen_base: Path, tmp_path: Path) -> None:
    recipe = RECIPE.model_copy(update={"steps": 1, "lora": LoraSpec(min_parameters=1e9)})
    result = run_sft(qwen_base, TRAIN, VAL, recipe, tmp_path / "merged", tmp_path / "work", seed=0)
    assert (result.method, result.adapter_dir, result.trainable_parameters) == ("full", None, result.parameters)
