"""The tokenizer and the corpus as packed token ids."""

from llm_assets.tokenizer.assets import (
    heldout_tokens,
    heldout_tokens_valid,
    token_shards,
    token_shards_valid,
    tokenizer,
    tokenizer_round_trip,
)

assets = [tokenizer, token_shards, heldout_tokens]
checks = [tokenizer_round_trip, token_shards_valid, heldout_tokens_valid]
