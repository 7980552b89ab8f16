"""The model: a Llama-style decoder built from a `ModelSize`, with a deterministic initialisation; or,
for continued pretraining, an imported base model of any causal architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llm_assets.manifest import ModelSize


def llama_config(size: ModelSize) -> LlamaConfig:
    """The transformers config for `size`; every architectural number comes from the manifest."""
    return LlamaConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads or size.num_heads,
        intermediate_size=size.intermediate_size,
        vocab_size=size.vocab_size,
        max_position_embeddings=size.max_seq_len,
        tie_word_embeddings=size.tie_embeddings,
        # Training never reuses past keys/values; a cache would only hold memory.
        use_cache=False,
    )


def build_model(size: ModelSize, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model: the same `seed` gives bit-identical weights.

    The seed is applied inside a forked RNG so that building a model leaves the caller's global
    torch RNG untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(size))


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding/LM head counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(size: ModelSize) -> int:
    """Training FLOPs per token: 6·N (2 forward + 4 backward per matmul weight).

    N is `ModelSize.matmul_parameters()`. Like Chinchilla's estimate this leaves out the attention
    scores (12·layers·hidden·seq_len per token), small while seq_len ≪ 6·hidden.
    """
    return 6 * size.matmul_parameters()


def load_base_model(model_dir: Path) -> PreTrainedModel:
    """The base model continued pretraining starts from, in fp32 (the loop's autocast decides the
    compute precision, as for a fresh model) and without a KV cache (training never reuses one)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def matmul_parameters(model: torch.nn.Module) -> int:
    """The N of 6·N·D for a model of any architecture: the weights of its matmul layers (Conv1D is
    GPT-2's), the LM head included; for the project's Llama, `ModelSize.matmul_parameters()`."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
