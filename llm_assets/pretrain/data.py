"""Training data: packed token ids read as fixed-length windows, in an order fixed by (seed, step).

The token ids of a split are one or more 1-D integer arrays (in the pipeline, `np.memmap`s of
`.bin` shards) read as one logical sequence. It is cut into non-overlapping windows of
`seq_len + 1` tokens (window i starts at token i·seq_len: inputs are its first `seq_len` tokens,
targets the last `seq_len`). Each epoch visits every window once, in a permutation drawn from
`numpy.random.default_rng((seed, epoch))`, and global batch `step` takes the next
`global_batch` windows of that endless sequence of epochs.

So the batch of a step is a pure function of (seed, global_batch, seq_len, step): the data
position a checkpoint needs is the step alone, and a resumed run reads exactly the batches an
uninterrupted run would have. The global batch is split across data-parallel ranks and
gradient-accumulation micro-batches by slicing, so 1 process × B sequences and 2 processes × B/2
(or 1 process × 2 micro-batches of B/2) train on the same sequences at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch


class TokenData:
    """One or more 1-D integer arrays of token ids, read as their concatenation."""

    def __init__(self, arrays: np.ndarray | Sequence[np.ndarray]):
        arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        for i, array in enumerate(arrays):
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"token array {i}: expected a 1-D integer array, got {array.dtype} {array.shape}")
        self.arrays = [a for a in arrays if len(a)]
        # starts[i] is the logical index of arrays[i][0]; starts[-1] is the total length.
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    @classmethod
    def from_bin_files(cls, paths: Sequence[str | PathLike], dtype: np.dtype | str) -> TokenData:
        """Memory-map raw `.bin` shards of `dtype` (uint16 or uint32) token ids; nothing is read yet."""
        return cls([np.memmap(path, dtype=dtype, mode="r") for path in paths])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across array boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        pieces = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[i])
            piece = self.arrays[i][offset : offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            i += 1
        return np.concatenate(pieces).astype(np.int64)


class TokenBatches:
    """Global batches of `global_batch` windows of `seq_len + 1` tokens: batch `step` depends on
    (seed, step) only (see the module docstring)."""

    def __init__(self, data: TokenData, *, seq_len: int, global_batch: int, seed: int):
        self.data, self.seq_len, self.global_batch, self.seed = data, seq_len, global_batch, seed
        # The last window needs one token past its seq_len inputs, for the last target.
        self.num_windows = (len(data) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(data)} tokens cannot fill one window of seq_len + 1 = {seq_len + 1} tokens")
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _windows(self, positions: np.ndarray) -> np.ndarray:
        """Window indices at positions of the endless sequence of shuffled epochs."""
        windows = np.empty_like(positions)
        for epoch in np.unique(positions // self.num_windows):
            # One epoch's permutation is cached: consecutive steps almost always share it.
            if epoch != self._epoch:
                self._epoch = int(epoch)
                self._order = np.random.default_rng((self.seed, self._epoch)).permutation(self.num_windows)
            here = positions // self.num_windows == epoch
            windows[here] = self._order[positions[here] % self.num_windows]
        return windows

    def rows(self, step: int, rows: slice) -> torch.Tensor:
        """Rows `rows` of global batch `step`, as a [len(rows), seq_len + 1] int64 tensor."""
        positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)[rows]
        windows = self._windows(positions)
        return torch.from_numpy(np.stack([self.data.read(int(w) * self.seq_len, self.seq_len + 1) for w in windows]))

    def micro_batch(self, step: int, *, micro: int, grad_accum: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's micro-batch `micro` of step `step`: rank r owns the r-th contiguous block of
        the global batch, cut in `grad_accum` equal micro-batches."""
        size, remainder = divmod(self.global_batch, world_size * grad_accum)
        if remainder:
            raise ValueError(
                f"global batch {self.global_batch} does not split into {world_size} ranks × {grad_accum} micro-batches"
            )
        first = (rank * grad_accum + micro) * size
        return self.rows(step, slice(first, first + size))


def pack_with_base_tokenizer(model_dir: Path, split_files: dict[str, list[Path]], out: Path,
                             batch_size: int) -> dict[str, int]:
    """Continued pretraining's data: the documents of each split (name -> its parquet files, a `text`
    column) encoded by the base model's own tokenizer, each followed by its eos, packed into
    `out/<split>/` as token_shards packs the project's; the token count of each split."""
    import polars as pl
    from transformers import AutoTokenizer

    from llm_assets.tokenizer.packing import pack_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: continued pretraining packs documents with the base model's fast tokenizer "
                         "and ends each with its eos token; this tokenizer has "
                         + ("no fast (tokenizer.json) backend" if backend is None else "no eos token")
                         + ": add them to the base model's tokenizer files")
    counts = {}
    for split, files in split_files.items():
        texts = [t for f in files for t in pl.read_parquet(f, columns=["text"])["text"].to_list()]
        (out / split).mkdir(parents=True, exist_ok=True)
        counts[split] = pack_documents(backend, texts, out / split, eos_id=tokenizer.eos_token_id,
                                       batch_size=batch_size).tokens
    return counts
