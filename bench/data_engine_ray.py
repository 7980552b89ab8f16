"""The data half's dedup work in-process vs as Ray tasks on a 2-CPU local Ray cluster.

Corpus: every ``.py`` file of the running Python's standard library (about 31 MB on CPython 3.11),
one document per file, cut into ``--shards`` shards. Each engine runs what the dedup assets run,
through the same seam (llm_assets/data/engine.py): MinHash signatures per shard
(``minhash_signatures_on``), then the spilled, partitioned clustering over all shards
(``cluster_sharded``, with ``--memory-mb`` per task). A third line clusters the same signatures
in memory (``cluster_near_duplicates``): what spilling costs. The cluster's start-up is timed
apart (once per deployment, not per step); connecting is timed with the work (every step does it).
Results must be identical on both engines, or the benchmark fails.

Each side runs ``--repeat`` times, interleaved, and its fastest run counts.
Usage: python bench/data_engine_ray.py [--shards 8] [--memory-mb 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.data.clustering import cluster_sharded  # noqa: E402
from llm_assets.data.dedup import cluster_near_duplicates, minhash_signatures_on  # noqa: E402
from llm_assets.data.engine import data_engine  # noqa: E402
from llm_assets.manifest import DataCompute, DedupRecipe  # noqa: E402
from llm_assets_tests.conftest import stop_process_group  # noqa: E402

RECIPE = DedupRecipe()


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.py"))
            if "site-packages" not in p.parts]


def dedup_on(engine_name: str, shards: list[list[str]], memory_mb: int) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Cluster labels, the signatures per shard, and the seconds the clustering alone took."""
    with data_engine(DataCompute(engine=engine_name, max_worker_memory_mb=memory_mb)) as engine:
        signatures = [minhash_signatures_on(engine, texts, num_perm=RECIPE.num_perm,
                                            shingle_size=RECIPE.shingle_size, seed=1) for texts in shards]
        with tempfile.TemporaryDirectory() as spill:
            seconds, clusters = timed(lambda: cluster_sharded(
                signatures, bands=RECIPE.bands, rows=RECIPE.rows, threshold=RECIPE.threshold,
                max_worker_memory_mb=memory_mb, spill_dir=Path(spill), engine=engine))
        return clusters.of(np.arange(sum(map(len, shards)))), signatures, seconds


def connect_seconds() -> float:
    """What every step on Ray pays besides its tasks: connecting to the cluster and leaving it."""

    def connect() -> None:
        with data_engine(DataCompute(engine="ray")):
            pass

    return timed(connect)[0]


def start_ray_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    for line in proc.stdout:
        if "Ray runtime started" in line:
            return proc, f"127.0.0.1:{port}"
    raise RuntimeError("ray start --head exited before the cluster was up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--memory-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    texts = stdlib_texts()
    shards = [list(piece) for piece in np.array_split(np.array(texts, dtype=object), args.shards)]
    megabytes = sum(map(len, texts)) / 1e6

    startup, (proc, address) = timed(lambda: start_ray_head(tempfile.mkdtemp(prefix="ray-")))
    try:
        best = dict.fromkeys(["in_process", "ray", "connect", "spilled", "in_memory"], float("inf"))
        labels = {}
        for _ in range(args.repeat):
            os.environ.pop("RAY_ADDRESS", None)
            seconds, (labels["in_process"], signatures, clustering) = timed(
                lambda: dedup_on("in_process", shards, args.memory_mb))
            best["in_process"], best["spilled"] = min(best["in_process"], seconds), min(best["spilled"], clustering)
            os.environ["RAY_ADDRESS"] = address
            seconds, (labels["ray"], _, _) = timed(lambda: dedup_on("ray", shards, args.memory_mb))
            best["ray"] = min(best["ray"], seconds)
            best["connect"] = min(best["connect"], connect_seconds())
            seconds, in_memory = timed(lambda: cluster_near_duplicates(
                np.concatenate(signatures), bands=RECIPE.bands, rows=RECIPE.rows, threshold=RECIPE.threshold))
            best["in_memory"] = min(best["in_memory"], seconds)
    finally:
        stop_process_group(proc, timeout=10)
    if not np.array_equal(labels["in_process"], labels["ray"]):
        raise SystemExit("the engines disagree: Ray's clusters differ from the in-process ones")
    if not np.array_equal(labels["in_process"], in_memory):
        raise SystemExit("the spilled clustering differs from the in-memory one")
    report(f"dedup (signatures + clustering) of {len(texts)} stdlib files, {megabytes:.1f} MB, "
           f"{args.shards} shards, {args.memory_mb} MB per task, best of {args.repeat}", [
        ("in-process", f"{best['in_process']:.2f} s ({megabytes / best['in_process']:.1f} MB/s)"),
        ("ray, 2-CPU local cluster", f"{best['ray']:.2f} s ({megabytes / best['ray']:.1f} MB/s)"),
        ("ray / in-process", f"{best['ray'] / best['in_process']:.2f}x"),
        ("  of which connecting (per step)", f"{best['connect']:.2f} s"),
        ("ray without connecting / in-process", f"{(best['ray'] - best['connect']) / best['in_process']:.2f}x"),
        ("ray cluster start-up (once)", f"{startup:.1f} s"),
        ("clustering, spilled (in-process)", f"{best['spilled']:.2f} s"),
        ("clustering, in memory (no spill)", f"{best['in_memory']:.2f} s"),
        ("spilled / in memory", f"{best['spilled'] / best['in_memory']:.2f}x"),
        ("duplicate clusters", str(int((np.bincount(in_memory) > 1).sum()))),
        ("identical on both engines", "yes"),
    ])


if __name__ == "__main__":
    main()
