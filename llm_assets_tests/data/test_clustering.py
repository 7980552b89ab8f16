"""Clustering in bounded memory: spilled band-bucket partitions give the in-memory clusters exactly."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from llm_assets.data.clustering import cluster_sharded, plan_clustering
from llm_assets.data.dedup import cluster_near_duplicates, minhash_signatures, minhash_signatures_on
from llm_assets.data.engine import EngineError, InProcessEngine, data_engine
from llm_assets.manifest import DataCompute

BANDS, ROWS, THRESHOLD = 16, 8, 0.8
EMPTY = np.iinfo(np.uint32).max


def planted_signatures(documents: int, seed: int = 0) -> np.ndarray:
    """Random signatures with what a corpus holds: near-copies (10% or 40% of positions
    redrawn: above and below the threshold), a boilerplate page copied 300 times (a bucket far
    over the size that gets all its pairs), and documents without shingles."""
    rng = np.random.default_rng(seed)
    signatures = rng.integers(0, EMPTY, size=(documents, BANDS * ROWS), dtype=np.uint32)
    for redrawn, count in ((0.1, documents // 5), (0.4, documents // 20)):
        source, copy = rng.integers(0, documents, count), rng.integers(0, documents, count)
        fresh = rng.integers(0, EMPTY, size=(count, BANDS * ROWS), dtype=np.uint32)
        signatures[copy] = np.where(rng.random((count, BANDS * ROWS)) < redrawn, fresh, signatures[source])
    signatures[rng.integers(0, documents, 300)] = signatures[documents // 2]
    signatures[rng.integers(0, documents, 40)] = EMPTY
    return signatures


def in_memory(signatures: np.ndarray) -> np.ndarray:
    return cluster_near_duplicates(signatures, bands=BANDS, rows=ROWS, threshold=THRESHOLD)


def sharded(shards: list[np.ndarray], spill, memory_mb: int) -> np.ndarray:
    clusters = cluster_sharded(shards, bands=BANDS, rows=ROWS, threshold=THRESHOLD, max_worker_memory_mb=memory_mb,
                               spill_dir=spill, engine=InProcessEngine())
    return clusters.of(np.arange(sum(len(s) for s in shards)))


@pytest.mark.parametrize("cuts", [[], [1000, 1000, 4321], [0, 6000]])  # one shard; an empty one; uneven ones
def test_sharded_clusters_equal_the_in_memory_clusters(tmp_path, cuts):
    signatures = planted_signatures(6000)
    expected = in_memory(signatures)
    assert (expected != np.arange(len(expected))).sum() > 1000  # many near-duplicates, so equality says something
    shards = np.split(signatures, cuts)
    for memory_mb in (1, 64):  # many partitions and small blocks; one partition
        spill = tmp_path / f"spill-{memory_mb}"
        spill.mkdir()
        assert np.array_equal(sharded(shards, spill, memory_mb), expected), memory_mb


def test_no_documents_no_clusters(tmp_path):
    assert sharded([np.empty((0, BANDS * ROWS), dtype=np.uint32)], tmp_path, 8).tolist() == []


def test_clustering_stays_under_its_memory_cap(tmp_path):
    """With a cap a fifth of all signatures together, clustering holds no more than the cap at
    its peak (numpy's allocations, as tracemalloc sees them; the shards are memory-mapped, as
    dedup_clusters reads them) and finds the same clusters as the in-memory path."""
    signatures = planted_signatures(40_000, seed=1)
    cap_mb = 4
    assert signatures.nbytes > 4 * cap_mb * 2**20
    files = []
    for i, shard in enumerate(np.array_split(signatures, 3)):
        np.save(tmp_path / f"shard{i}.npy", shard)
        files.append(np.load(tmp_path / f"shard{i}.npy", mmap_mode="r"))
    spill = tmp_path / "spill"
    spill.mkdir()
    tracemalloc.start()
    try:
        got = sharded(files, spill, cap_mb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < cap_mb * 2**20, f"peak {peak / 2**20:.1f} MB over the cap of {cap_mb} MB"
    assert np.array_equal(got, in_memory(signatures))


def test_a_smaller_cap_cuts_more_partitions_and_smaller_pieces():
    plans = [plan_clustering(10**7, 128, bands=BANDS, rows=ROWS, threshold=THRESHOLD, max_worker_memory_mb=mb)
             for mb in (256, 1024, 4096)]
    assert [p.partitions for p in plans] == sorted((p.partitions for p in plans), reverse=True)
    assert plans[0].partitions > plans[-1].partitions > 1
    assert plans[0].block_documents < plans[-1].block_documents
    assert plans[0].pair_batch < plans[-1].pair_batch


def test_bands_must_fit_the_signature():
    with pytest.raises(ValueError, match="exceeds the signature length"):
        plan_clustering(10, 8, bands=3, rows=3, threshold=0.5, max_worker_memory_mb=1)


def test_the_ray_engine_needs_a_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(EngineError, match=r"compute.data.engine is 'ray'.*RAY_ADDRESS is not set"):
        with data_engine(DataCompute(engine="ray")):
            pass


def test_the_in_process_engine_is_the_default():
    with data_engine(DataCompute()) as engine:
        assert engine.name == "in_process"
        assert engine.map(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]


class ThreeAtOnce(InProcessEngine):
    """An engine that cuts work as a 3-CPU cluster would."""

    def parallelism(self) -> int:
        return 3


def test_signatures_cut_into_pieces_per_engine_are_the_whole_shards():
    texts = [f"document {i} " + "word " * (i % 50) + f"tail {i % 7}" for i in range(500)] + ["", "!!"]
    recipe = {"num_perm": 64, "shingle_size": 3, "seed": 11}
    whole = minhash_signatures(texts, **recipe)
    assert np.array_equal(minhash_signatures_on(ThreeAtOnce(), texts, **recipe), whole)
    assert minhash_signatures_on(ThreeAtOnce(), [], **recipe).shape == (0, 64)
