"""Byte-level BPE: training, the Hugging Face layout, and the round-trip test.

Byte-level BPE is lossless by construction (every byte has a token), so decode(encode(text)) must
give the text back exactly; the round-trip check holds the tokenizer to that on held-out text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_assets.manifest import TokenizerRecipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def train_bpe(texts: Iterable[str], recipe: TokenizerRecipe, *, length: int | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=recipe.min_frequency,
        special_tokens=recipe.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, recipe: TokenizerRecipe, out_dir: Path) -> PreTrainedTokenizerFast:
    """Save in the Hugging Face layout, so AutoTokenizer.from_pretrained(out_dir) loads it."""
    from transformers import PreTrainedTokenizerFast  # transformers loads when a tokenizer is saved

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=recipe.eos_token,
        bos_token=recipe.eos_token,  # GPT-2 convention: one separator token opens and closes documents
        pad_token=recipe.pad_token,
        additional_special_tokens=list(recipe.extra_special_tokens) or None,
    )
    wrapped.save_pretrained(out_dir)
    return wrapped


def round_trip_failures(tokenizer: Tokenizer, ids: Sequence[str], texts: Sequence[str]) -> Iterator[tuple[str, int]]:
    """(document id, first differing character) for every text that does not survive encode+decode."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    for doc_id, text, encoding in zip(ids, texts, encodings):
        back = tokenizer.decode(encoding.ids, skip_special_tokens=False)
        if back != text:
            first = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            yield doc_id, first
