"""The model built from a ModelSize, and its Hugging Face export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from llm_assets.hf_models import save_hf
from llm_assets.pretrain import build_model, count_parameters, flops_per_token
from llm_assets_tests.pretrain.tiny import TINY, VOCAB


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build_model(TINY, seed=0), build_model(TINY, seed=0), build_model(TINY, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    build_model(TINY, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_architecture_follows_the_model_size() -> None:
    model = build_model(TINY, seed=0)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (64, 2, 4, 2, 128, 256, 64)
    # Parameters = the matmul weights of ModelSize.matmul_parameters() + input embedding + RMSNorm gains.
    norms = (2 * TINY.num_layers + 1) * TINY.hidden_size
    embedding = VOCAB * TINY.hidden_size
    assert count_parameters(model) == TINY.matmul_parameters() + embedding + norms
    tied = TINY.model_copy(update={"tie_embeddings": True})
    tied_model = build_model(tied, seed=0)
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight
    assert count_parameters(tied_model) == tied.matmul_parameters() + norms
    assert flops_per_token(TINY) == 6 * TINY.matmul_parameters()


def _tokenizer_dir(path: Path) -> Path:
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="t1",
                            pad_token="t2").save_pretrained(path)
    return path


def test_save_hf_reloads_with_the_same_logits(tmp_path: Path) -> None:
    for tie in (False, True):
        model = build_model(TINY.model_copy(update={"tie_embeddings": tie}), seed=3)
        out = save_hf(model, tmp_path / f"export-{tie}", _tokenizer_dir(tmp_path / f"tokenizer-{tie}"))
        assert (out / "model.safetensors").is_file()
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tie
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer("t5 t7").input_ids == [5, 7]
        # Generation stops on the tokenizer's EOS, not on Llama's default id.
        assert reloaded.config.eos_token_id == reloaded.generation_config.eos_token_id == 1
        assert reloaded.config.pad_token_id == 2


def test_save_hf_refuses_a_tokenizer_file_that_would_overwrite_the_model(tmp_path: Path) -> None:
    tokenizer_dir = _tokenizer_dir(tmp_path / "tokenizer")
    (tokenizer_dir / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="config.json"):
        save_hf(build_model(TINY, seed=0), tmp_path / "export", tokenizer_dir)
