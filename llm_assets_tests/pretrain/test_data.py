"""Token data read as one sequence, and batches that are a pure function of (seed, step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm_assets.pretrain import TokenBatches, TokenData


def test_arrays_read_as_one_sequence_across_boundaries(tmp_path: Path) -> None:
    tokens = np.arange(30, dtype=np.uint32)
    data = TokenData([tokens[:10], tokens[10:10], tokens[10:15], tokens[15:]])
    assert len(data) == 30
    assert data.read(8, 10).tolist() == list(range(8, 18))
    assert data.read(0, 30).dtype == np.int64
    with pytest.raises(IndexError):
        data.read(25, 6)
    for i, part in enumerate((tokens[:12], tokens[12:])):
        part.astype(np.uint16).tofile(tmp_path / f"shard-{i}.bin")
    memmapped = TokenData.from_bin_files(sorted(tmp_path.glob("*.bin")), "uint16")
    assert memmapped.read(0, 30).tolist() == list(range(30))


def test_windows_are_next_token_pairs_and_each_epoch_visits_every_window_once() -> None:
    # 101 tokens, seq_len 10: 10 windows; 2 steps of 5 windows make one epoch.
    batches = TokenBatches(TokenData(np.arange(101, dtype=np.uint16)), seq_len=10, global_batch=5, seed=0)
    epoch0 = torch.cat([batches.rows(0, slice(None)), batches.rows(1, slice(None))])
    epoch1 = torch.cat([batches.rows(2, slice(None)), batches.rows(3, slice(None))])
    for window in epoch0:
        assert window[0] % 10 == 0 and torch.equal(window, torch.arange(window[0], window[0] + 11))
    starts0, starts1 = epoch0[:, 0].tolist(), epoch1[:, 0].tolist()
    assert sorted(starts0) == sorted(starts1) == list(range(0, 100, 10))
    assert starts0 != starts1  # reshuffled each epoch


def test_the_batch_of_a_step_depends_on_seed_and_step_only() -> None:
    data = TokenData(np.arange(5_000, dtype=np.uint16))
    a = TokenBatches(data, seq_len=16, global_batch=8, seed=7)
    b = TokenBatches(data, seq_len=16, global_batch=8, seed=7)
    forwards = [a.rows(step, slice(None)) for step in range(60)]  # crosses epochs (312 windows)
    backwards = [b.rows(step, slice(None)) for step in reversed(range(60))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forwards, backwards))
    other_seed = TokenBatches(data, seq_len=16, global_batch=8, seed=8)
    assert not torch.equal(other_seed.rows(0, slice(None)), forwards[0])


def test_ranks_and_micro_batches_partition_the_global_batch() -> None:
    batches = TokenBatches(TokenData(np.arange(10_000, dtype=np.uint16)), seq_len=8, global_batch=12, seed=0)
    whole = batches.rows(3, slice(None))
    pieces = [batches.micro_batch(3, micro=m, grad_accum=2, rank=r, world_size=3) for r in range(3) for m in range(2)]
    assert all(p.shape == (2, 9) for p in pieces)
    assert torch.equal(torch.cat(pieces), whole)
    with pytest.raises(ValueError, match="does not split"):
        batches.micro_batch(0, micro=0, grad_accum=5, rank=0, world_size=1)


def test_too_little_data_for_one_window_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot fill one window"):
        TokenBatches(TokenData(np.arange(16, dtype=np.uint16)), seq_len=16, global_batch=1, seed=0)
