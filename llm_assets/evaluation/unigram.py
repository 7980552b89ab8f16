"""The unigram baseline of the held-out bits per byte: token frequencies of the training shards,
scored on the very documents lm-eval's ``heldout_perplexity`` task scores, in lm-eval's units.

lm-eval's ``bits_per_byte`` of a ``loglikelihood_rolling`` task (``lm_eval.api.metrics``) is
``−Σ_docs loglikelihood / Σ_docs bytes / ln 2``: a sum over the documents, not a mean of
per-document figures; every token of a document is predicted (the first from a prefix token),
no end-of-text token is scored, and a document's bytes are ``len(text.encode("utf-8"))``. The
unigram model scores the same: ``−Σ log2 p(token)`` over each document's tokens, over the same
UTF-8 bytes. Bits per byte do not depend on the tokenizer, so the documents are encoded with the
tokenizer the counts were made with: for a size pretrained here, the project's, whose token shards
are counted (:func:`shard_log_probs`); for a size started from a base model, the model's own, with
which the training split's texts are encoded and counted (:func:`text_log_probs`).

Pure functions, no Dagster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from llm_assets.pretrain.data import TokenData
from llm_assets.pretrain.loop import unigram_log_probs
from llm_assets.tokenizer.packing import read_packed


def shard_log_probs(shard_dirs: Sequence[Path]) -> np.ndarray:
    """Natural-log unigram probabilities (add-one smoothed) of the packed training shards in
    ``shard_dirs``, over their tokenizer's vocabulary."""
    if not shard_dirs:
        raise ValueError("no token shard to count: the unigram baseline needs the training token shards")
    packed = [read_packed(Path(d)) for d in shard_dirs]
    # Every shard is packed by the same tokenizer artifact (token_shards' input-chain gate holds it).
    vocab_size = packed[0][2].vocab_size
    return unigram_log_probs(TokenData([tokens for tokens, _, _ in packed]), vocab_size)


def text_log_probs(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Natural-log unigram probabilities (add-one smoothed) of ``texts`` encoded by ``tokenizer``
    (no special tokens, as the shards are packed), over its vocabulary, added tokens included."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids = [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]
    # Added tokens may sit past the vocabulary's size when their ids have gaps.
    highest = max((int(a.max()) for a in ids if len(a)), default=-1)
    return unigram_log_probs(TokenData(ids), max(tokenizer.get_vocab_size(with_added_tokens=True), highest + 1))


def unigram_bits_per_byte(texts: Sequence[str], tokenizer: Tokenizer, log_probs: np.ndarray) -> float:
    """lm-eval's bits per byte of the unigram model ``log_probs`` (natural log, indexed by token id
    of ``tokenizer``) on ``texts``."""
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if total_bytes == 0:
        raise ValueError("unigram_bits_per_byte: no text to score (the documents are empty)")
    # As the shards were packed: no special tokens (lm-eval adds none for this tokenizer either).
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    nats = -sum(float(log_probs[encoding.ids].sum()) for encoding in encodings)
    return nats / math.log(2) / total_bytes
