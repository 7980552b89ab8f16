"""Token shards: documents encoded in batches and packed end to end, each followed by EOS.

Layout of a packed shard (all little-endian, readable with ``np.memmap``):

- ``tokens.bin``: every token id, ``uint16`` when the vocabulary fits, else ``uint32``;
- ``index.npy``: int64 start offset of every document, plus the total length at the end;
- ``meta.json``: dtype, token and document counts, vocab size, EOS id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

TOKENS_FILE = "tokens.bin"
INDEX_FILE = "index.npy"
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class PackedShard:
    tokens: int
    documents: int
    dtype: str
    vocab_size: int
    eos_id: int


def _batched(texts: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(texts), size):
        yield texts[start:start + size]


def pack_documents(
    tokenizer: Tokenizer, texts: Sequence[str], out_dir: Path, *, eos_id: int, batch_size: int
) -> PackedShard:
    """Encode ``texts`` batch by batch, append EOS to each, and write one packed shard."""
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    offsets = [0]
    with open(out_dir / TOKENS_FILE, "wb") as handle:
        for batch in _batched(texts, batch_size):
            for encoding in tokenizer.encode_batch(list(batch), add_special_tokens=False):
                ids = np.asarray(encoding.ids + [eos_id], dtype=dtype)
                handle.write(ids.tobytes())
                offsets.append(offsets[-1] + len(ids))
    np.save(out_dir / INDEX_FILE, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    shard = PackedShard(tokens=offsets[-1], documents=len(texts), dtype=dtype.name, vocab_size=vocab, eos_id=eos_id)
    (out_dir / META_FILE).write_text(json.dumps(shard.__dict__, sort_keys=True))
    return shard


def read_packed(root: Path) -> tuple[np.ndarray, np.ndarray, PackedShard]:
    """(tokens memmap, document offsets, meta) of a packed shard."""
    meta = PackedShard(**json.loads((root / META_FILE).read_text()))
    size = (root / TOKENS_FILE).stat().st_size // np.dtype(meta.dtype).itemsize
    tokens = (
        np.memmap(root / TOKENS_FILE, dtype=meta.dtype, mode="r", shape=(size,)) if size else np.empty(0, meta.dtype)
    )
    return tokens, np.load(root / INDEX_FILE), meta


def packing_problems(root: Path) -> list[str]:
    """Everything wrong with a packed shard: counts, id range, document separators."""
    tokens, offsets, meta = read_packed(root)
    problems = []
    if len(tokens) != meta.tokens or offsets[-1] != meta.tokens:
        problems.append(f"{TOKENS_FILE} holds {len(tokens)} ids, index ends at {offsets[-1]}, meta says {meta.tokens}")
    if len(offsets) != meta.documents + 1:
        problems.append(f"{INDEX_FILE} has {len(offsets) - 1} documents, meta says {meta.documents}")
    if len(tokens):
        top = int(tokens.max())
        if top >= meta.vocab_size:
            problems.append(f"token id {top} is not below the vocabulary size {meta.vocab_size}")
        ends = offsets[1:] - 1
        missing = int((tokens[ends[ends < len(tokens)]] != meta.eos_id).sum())
        if missing:
            problems.append(f"{missing} documents do not end with EOS ({meta.eos_id})")
    return problems
