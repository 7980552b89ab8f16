"""Near-duplicate clustering in bounded memory per worker, over shards, on any data engine.

The same clusters as :func:`llm_assets.data.dedup.cluster_near_duplicates`, bit for bit, without
any process holding every signature:

1. spill, one task per block of documents: the block's signatures go into one signatures file in
   the spill folder, and every document with shingles gets one row per LSH band, (band, band key,
   document), written into the hash partition of its (band, key):
   ``rows/part-PPPPP/block-BBBBBB.npy``.
2. link, one task per partition: its rows from every block, sorted by (band, key, document). A
   bucket (one band's key) lies wholly in one partition, so its candidate pairs are exactly the
   in-memory path's; they are opened a bounded batch at a time, and those whose estimated Jaccard
   (signature rows read from the spilled file) reaches the threshold are kept:
   ``links/part-PPPPP.npy``.
3. components, in the caller's process: union-find over the distinct links, with the nodes
   renumbered to the documents that have a link, so it holds links, not documents or signatures.

``max_worker_memory_mb`` sizes the work (:func:`plan_clustering`): the number of partitions, the
documents per spill block and the candidate pairs per batch. The spill folder must be one every
worker sees: the step's staging folder on one machine, a shared volume on a multi-node cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from llm_assets.data.dedup import (
    agreement,
    band_key,
    bucket_pairs,
    bucket_partners,
    bucket_starts,
    budget_spans,
    is_empty,
    mix64,
)
from llm_assets.data.dedup import components as connected_components
from llm_assets.data.engine import DataEngine

SIGNATURES_FILE = "signatures.npy"
ROW_BYTES = 24  # a spilled row: band, key and document as three uint64
# Copies of its rows a task holds at its peak: spill — band keys, partition numbers, the sort
# order, the rows; link — the rows read, concatenated, the sort order, the sorted copy, the bucket
# bookkeeping. Measured by test_clustering_stays_under_its_memory_cap.
ROW_COPIES = 6
# Per candidate pair in a batch: two gathered signature rows, their comparison, the pair itself
# and the bookkeeping around it, in units of one signature position (4 bytes) plus a constant.
PAIR_SIGNATURE_COPIES = 3


@dataclass(frozen=True)
class ClusterPlan:
    """How clustering is cut up to fit ``max_worker_memory_mb`` per task."""

    documents: int
    num_perm: int
    bands: int
    rows: int
    threshold: float
    partitions: int
    block_documents: int
    pair_batch: int


@dataclass(frozen=True)
class Clusters:
    """The documents that share a cluster with another one (ascending global index) and each
    one's cluster: its smallest member. Every other document is a cluster of its own. ``plan``:
    how the work was cut up."""

    members: np.ndarray
    labels: np.ndarray
    plan: ClusterPlan

    def of(self, documents: np.ndarray) -> np.ndarray:
        """The cluster of each of these documents (global indices), as ``cluster_near_duplicates`` labels it."""
        documents = np.asarray(documents, dtype=np.int64)
        if not len(self.members):
            return documents
        at = np.minimum(np.searchsorted(self.members, documents), len(self.members) - 1)
        return np.where(self.members[at] == documents, self.labels[at], documents)


def plan_clustering(
    documents: int, num_perm: int, *, bands: int, rows: int, threshold: float, max_worker_memory_mb: int
) -> ClusterPlan:
    """Sizes that keep each task within the cap: half of it for a link task's rows, half for its
    batch of candidate pairs; a spill block is as many documents as fit the whole cap."""
    if bands * rows > num_perm:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the signature length {num_perm}")
    cap = max_worker_memory_mb * 2**20
    return ClusterPlan(
        documents=documents, num_perm=num_perm, bands=bands, rows=rows, threshold=threshold,
        partitions=max(1, math.ceil(documents * bands * ROW_BYTES * ROW_COPIES / (cap / 2))),
        block_documents=max(1, cap // (num_perm * 4 + bands * ROW_BYTES * ROW_COPIES)),
        pair_batch=max(1, (cap // 2) // (PAIR_SIGNATURE_COPIES * 2 * num_perm * 4 + 64)),
    )


def cluster_sharded(
    shards: Sequence[np.ndarray], *, bands: int, rows: int, threshold: float, max_worker_memory_mb: int,
    spill_dir: Path, engine: DataEngine,
) -> Clusters:
    """Near-duplicate clusters of the documents of all shards, numbered in shard order.

    ``shards`` are the shards' signature matrices (uint32, one row per document), best memory-mapped
    (``np.load(..., mmap_mode="r")``): only one block of them is read at a time.
    """
    documents = sum(len(shard) for shard in shards)
    num_perm = shards[0].shape[1] if shards else bands * rows
    plan = plan_clustering(
        documents, num_perm, bands=bands, rows=rows, threshold=threshold, max_worker_memory_mb=max_worker_memory_mb
    )
    if not documents:
        return Clusters(members=np.empty(0, dtype=np.int64), labels=np.empty(0, dtype=np.int64), plan=plan)
    # Created here, filled by the spill tasks, each at its own rows.
    open_memmap(spill_dir / SIGNATURES_FILE, mode="w+", dtype=np.uint32, shape=(documents, num_perm)).flush()
    blocks, first = [], 0
    for shard in shards:
        for lo in range(0, len(shard), plan.block_documents):
            block = shard[lo : lo + plan.block_documents]
            blocks.append((block, first + lo, str(spill_dir), len(blocks), plan))
        first += len(shard)
    engine.map(spill_block, blocks, memory_mb=max_worker_memory_mb)
    engine.map(link_partition, [(str(spill_dir), part, plan) for part in range(plan.partitions)],
               memory_mb=max_worker_memory_mb)
    return linked_components(spill_dir, plan)


def spill_block(signatures: np.ndarray, first: int, spill_dir: str, block: int, plan: ClusterPlan) -> int:
    """Spill one block of documents (global indices from ``first``): its signatures into the
    shared file, its band rows into their partitions. Returns how many rows it spilled."""
    spill = Path(spill_dir)
    shared = np.load(spill / SIGNATURES_FILE, mmap_mode="r+")
    shared[first : first + len(signatures)] = signatures
    shared.flush()
    del shared
    live = np.flatnonzero(~is_empty(signatures))
    signatures = np.asarray(signatures[live])
    document = live.astype(np.uint64) + np.uint64(first)
    spilled = np.empty((len(live) * plan.bands, 3), dtype=np.uint64)
    for band in range(plan.bands):
        at = slice(band * len(live), (band + 1) * len(live))
        spilled[at, 0], spilled[at, 1], spilled[at, 2] = band, band_key(signatures, band, plan.rows), document
    part = mix64(spilled[:, 1] + spilled[:, 0]) % np.uint64(plan.partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(plan.partitions + 1, dtype=np.uint64))
    for p in np.flatnonzero(np.diff(bounds)):
        folder = spill / "rows" / f"part-{p:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"block-{block:06d}.npy", spilled[order[bounds[p] : bounds[p + 1]]], allow_pickle=False)
    return len(spilled)


def link_partition(spill_dir: str, part: int, plan: ClusterPlan) -> int:
    """Verify the candidate pairs of one partition's buckets; write the pairs that reach the
    threshold. Returns how many it wrote."""
    spill = Path(spill_dir)
    pieces = [np.load(f) for f in sorted((spill / "rows" / f"part-{part:05d}").glob("block-*.npy"))]
    spilled = np.concatenate(pieces) if pieces else np.empty((0, 3), dtype=np.uint64)
    del pieces
    # By band, then key, then document: members ascend within a bucket, as in the in-memory path.
    spilled = spilled[np.lexsort((spilled[:, 2], spilled[:, 1], spilled[:, 0]))]
    starts = bucket_starts(spilled[:, 0], spilled[:, 1])
    member = spilled[:, 2].astype(np.int64)
    del spilled
    bucket_first = np.flatnonzero(starts)
    pairs_per_bucket = np.add.reduceat(bucket_partners(starts), bucket_first) if len(bucket_first) else bucket_first
    bucket_bounds = np.r_[bucket_first, len(member)]
    signatures = np.load(spill / SIGNATURES_FILE, mmap_mode="r")
    links = [np.empty((0, 2), dtype=np.int64)]
    # Whole buckets per batch, about pair_batch pairs each (one bucket larger than that is one batch).
    for lo, hi in budget_spans(pairs_per_bucket, plan.pair_batch):
        at = slice(bucket_bounds[lo], bucket_bounds[hi])
        pairs = bucket_pairs(starts[at], member[at])
        keep = agreement(signatures[pairs[:, 0]], signatures[pairs[:, 1]]) >= plan.threshold
        links.append(pairs[keep])
    found = _distinct(np.concatenate(links), plan.documents)
    (spill / "links").mkdir(exist_ok=True)
    np.save(spill / "links" / f"part-{part:05d}.npy", found, allow_pickle=False)
    return len(found)


def linked_components(spill_dir: Path, plan: ClusterPlan) -> Clusters:
    """Connected components of the links of every partition, over the linked documents only."""
    links = np.empty((0, 2), dtype=np.int64)
    for part in range(plan.partitions):
        found = np.load(spill_dir / "links" / f"part-{part:05d}.npy")
        links = _distinct(np.concatenate([links, found]), plan.documents)
    members = np.unique(links)
    root = connected_components(len(members), np.searchsorted(members, links))
    # members ascend, so a component's smallest renumbered node is its smallest document
    return Clusters(members=members, labels=members[root], plan=plan)


def _distinct(pairs: np.ndarray, documents: int) -> np.ndarray:
    """The distinct pairs, sorted (a pair found in several bands is one link)."""
    n = np.int64(documents)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)
