"""The data half on a real local Ray cluster: the same artifacts, bit for bit, as in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml

from llm_assets.data.clustering import cluster_sharded
from llm_assets.data.dedup import cluster_near_duplicates
from llm_assets.data.engine import data_engine
from llm_assets.definitions import build_definitions
from llm_assets.manifest import DataCompute
from llm_assets.runner import materialize_graph
from llm_assets.settings import Settings
from llm_assets_tests.conftest import stop_process_group
from llm_assets_tests.data.test_clustering import BANDS, ROWS, THRESHOLD, planted_signatures

pytestmark = pytest.mark.slow  # a Ray cluster takes 10–20 s to start on 2 busy cores
DEDUP_CHAIN = "+key:dedup_corpus"  # raw_corpus, clean_corpus, minhash_signatures, dedup_clusters, dedup_corpus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A 2-CPU Ray head on 127.0.0.1 (`ray start --head --block` in its own process group, its
    session files in a temp dir of its own), stopped afterwards even when a test fails. Only what the
    tests use runs: no dashboard, no log monitor (the engine connects with log_to_driver=False; a
    task's error reaches the driver as its exception). No drain on SIGTERM: Ray's default holds the
    node up to 30 s for Ray Serve replicas, which this cluster never runs."""
    port = _free_port()
    # Short: Ray's unix sockets live under it, and a socket path may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--include-log-monitor=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            raise RuntimeError("ray start --head exited:\n" + "".join(seen[-40:]))
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_group(proc, timeout=10)


@pytest.fixture
def on_ray(monkeypatch, ray_address) -> str:
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    return ray_address


def test_clustering_as_ray_tasks_equals_in_memory(on_ray, tmp_path):
    signatures = planted_signatures(6000, seed=3)
    with data_engine(DataCompute(engine="ray")) as engine:
        assert engine.name == "ray" and engine.parallelism() == 2
        clusters = cluster_sharded(np.array_split(signatures, 3), bands=BANDS, rows=ROWS, threshold=THRESHOLD,
                                   max_worker_memory_mb=1, spill_dir=tmp_path, engine=engine)
    expected = cluster_near_duplicates(signatures, bands=BANDS, rows=ROWS, threshold=THRESHOLD)
    assert np.array_equal(clusters.of(np.arange(len(signatures))), expected)


def _dedup_chain_hashes(tmp_path: Path, manifest_path: Path, engine: str) -> dict[tuple[str, str | None], str]:
    """Materialize the dedup chain with this engine into a store of its own; every artifact's hash."""
    manifest = yaml.safe_load(manifest_path.read_text())
    # The smallest cap: tasks as small as they get (test_clustering_as_ray_tasks_equals_in_memory
    # has the corpus that spills into many partitions).
    manifest["compute"] = {"data": {"engine": engine, "max_worker_memory_mb": 1}}
    path = tmp_path / f"pipeline-{engine}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    settings = Settings(manifest=str(path), store_uri=str(tmp_path / f"artifacts-{engine}"),
                        alerts_jsonl=str(tmp_path / "alerts.jsonl"), alert_webhook_url=None, s3_endpoint_url=None)
    # An in-memory instance: the claim is about the artifacts, and a sqlite one costs seconds per run.
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize_graph(build_definitions(settings), instance, selection=DEDUP_CHAIN, log=lambda _: None)
        assert result.success, engine
        assert all(not o.cache_hit for o in result.outcomes)
        clustered = instance.get_latest_materialization_event(dg.AssetKey("dedup_clusters")).asset_materialization
        assert clustered.metadata["engine"].value == engine
        return {(o.asset, o.partition): o.sha256 for o in result.outcomes}


def test_the_dedup_chain_on_ray_is_bit_identical_to_in_process(on_ray, tmp_path, manifest_path, monkeypatch):
    on_ray_hashes = _dedup_chain_hashes(tmp_path, manifest_path, "ray")
    monkeypatch.delenv("RAY_ADDRESS")  # the in-process run must not need, or touch, the cluster
    in_process_hashes = _dedup_chain_hashes(tmp_path, manifest_path, "in_process")
    assert {asset for asset, _ in in_process_hashes} >= {"minhash_signatures", "dedup_clusters", "dedup_corpus"}
    assert on_ray_hashes == in_process_hashes
