"""Shared fixtures: real stores (local and S3 on a real SeaweedFS), real Dagster instances."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.settings import Settings
from llm_assets.store import ArtifactStore, open_store


def scratch_in_memory(min_free_bytes: int = 4 * 2**30) -> None:
    """Put the tests' scratch (pytest's tmp_path, every temporary directory, the Dagster instances
    and stores in them, and those of the processes the tests start) in RAM, on /dev/shm, when it
    is a tmpfs with room. Every Dagster event is an SQLite commit and every artifact a synced
    write: on a disk each waits for the device (ten tiny runs: 4.5 s on disk against 3.1 s in RAM
    on a quiet machine, and the gap grows with two workers writing at once). An explicit TMPDIR
    is kept; pytest keeps only the failed tests' folders (pyproject.toml), so little stays in RAM."""
    if os.environ.get("TMPDIR"):
        return
    shm = Path("/dev/shm")
    try:
        roomy = shutil.disk_usage(shm).free >= min_free_bytes and os.access(shm, os.W_OK)
    except OSError:
        return
    if roomy:
        scratch = shm / f"llm-assets-tests-{os.getuid()}"
        scratch.mkdir(exist_ok=True)
        # Open to all, sticky, as /tmp is: a test's server may run as another user (PostgreSQL
        # under root) and must reach the folder the test made for it.
        scratch.chmod(0o1777)
        os.environ["TMPDIR"] = str(scratch)
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again


scratch_in_memory()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# MLflow tracking costs seconds per step process; test_tracking.py turns it on against its own server.
os.environ.setdefault("LLM_ASSETS_TRACKING", "off")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (and in every process a test starts), instead of
    # two workers' thread pools spinning against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# A manifest small enough for tests: two stdlib packages, cut into a few shards.
TEST_MANIFEST = {
    "version": 1,
    "name": "test",
    "seed": 7,
    "sources": [
        {"kind": "python_stdlib", "name": "stdlib", "include": ["json/*", "email/*"], "shard_mb": 0.17}
    ],
    "stages": {"splits": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "budget": {"usd_cap": 1.0, "usd_per_gpu_hour": 2.0, "peak_flops_per_gpu": 1e15, "assumed_mfu": 0.4},
}
# The safety gates every manifest that evaluates must carry, set so that they judge and never
# hold the tiny models of a test (the tests of the gates themselves set real thresholds).
SAFETY_GATES = {"safety.refusal_rate": {"min": 0.0}, "safety.benign_refusal_rate": {"max": 1.0}}


@pytest.fixture(autouse=True)
def restore_environment() -> Iterator[None]:
    """Each test leaves the environment as it found it. The CLI's `main()`, called in-process, sets
    LLM_ASSETS_MANIFEST (and DAGSTER_HOME) for the processes it starts: left behind, a later
    test's child process would load that test's manifest, or fail on a file since removed."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: under two workers the longest one starts at once instead
    of becoming the tail of the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server started with start_new_session=True: SIGTERM to its group, SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[str]:
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1; yields its endpoint URL."""
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
    cmd = [
        weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-admin.ui=false",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
    ]
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"SeaweedFS did not start; log: {(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield endpoint
    stop_process_group(proc)
    log.close()


@pytest.fixture
def s3_client(seaweedfs, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return boto3.client("s3", endpoint_url=seaweedfs)


@pytest.fixture
def s3_bucket(s3_client) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path) -> ArtifactStore:
    """The same contract, run against both backends."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    client = request.getfixturevalue("s3_client")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/llm", s3_client=client, cache_dir=tmp_path / "cache")


@pytest.fixture
def manifest_path(tmp_path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(TEST_MANIFEST, sort_keys=False))
    return path


@pytest.fixture
def settings(tmp_path, manifest_path) -> Settings:
    return Settings(
        manifest=str(manifest_path),
        store_uri=str(tmp_path / "artifacts"),
        alerts_jsonl=str(tmp_path / "alerts.jsonl"),
        alert_webhook_url=None,
        s3_endpoint_url=None,
    )


@pytest.fixture
def defs(settings) -> dg.Definitions:
    return build_definitions(settings)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.local_temp() as inst:
        yield inst
