"""Staging folders: a live writer keeps its folder fresh; a killed writer's is swept by age."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llm_assets.store import ArtifactStore, open_store
from llm_assets.store.fileio import kept_fresh

DAY = 24 * 3600


def age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything under it ``seconds`` into the past."""
    past = time.time() - seconds
    for sub in [path, *path.rglob("*")]:
        os.utime(sub, (past, past), follow_symlinks=False)


def debris(root: Path, name: str) -> Path:
    folder = root / name
    (folder / "files" / "deep").mkdir(parents=True)
    (folder / "files" / "deep" / "part-00.bin").write_bytes(b"\x00" * 1000)
    return folder


def test_remove_stale_staging_removes_old_folders_only(any_store: ArtifactStore, tmp_path):
    ref = any_store.put_dir(_tree(tmp_path / "src"))
    any_store.local_dir(ref.sha256)  # S3: a cached copy, which a sweep must never touch
    root = any_store.backend.staging_root()
    root.mkdir(parents=True, exist_ok=True)
    dead = debris(root, f"{'a' * 64}.deadbeef")
    fresh = debris(root, "build-fresh")
    age(dead, 2 * DAY)
    with any_store.staging_dir() as live:
        (live / "out.bin").write_bytes(b"1")
        removed = any_store.remove_stale_staging(3600)
        assert removed == [str(dead)]
        assert not dead.exists() and fresh.exists() and live.exists()
    assert any_store.verify(ref.sha256).ok
    assert any_store.local_dir(ref.sha256, verify=True).is_dir()
    assert any_store.remove_stale_staging(3600) == []


def test_nested_recent_write_keeps_a_folder(tmp_path):
    store = open_store(str(tmp_path / "store"))
    folder = debris(store.backend.staging_root(), "build-slow")
    age(folder, 2 * DAY)
    (folder / "files" / "deep" / "part-01.bin").write_bytes(b"new")  # the writer is still at work
    assert store.remove_stale_staging(3600) == []
    assert folder.exists()


def test_s3_staging_lives_in_the_store_owned_cache(s3_client, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/llm", s3_client=s3_client, cache_dir=tmp_path / "cache")
    with store.staging_dir() as build:
        assert build.parent == tmp_path / "cache" / "tmp"
    dead = debris(tmp_path / "cache" / "tmp", "download-0123456789ab-dead")
    age(dead, 2 * DAY)
    assert store.remove_stale_staging(60) == [str(dead)]


def test_live_writer_touches_its_folder(tmp_path):
    folder = tmp_path / "build"
    folder.mkdir()
    age(folder, 2 * DAY)
    with kept_fresh(folder, interval=0.05):
        deadline = time.time() + 5
        while time.time() - folder.stat().st_mtime > 60 and time.time() < deadline:
            time.sleep(0.05)
    assert time.time() - folder.stat().st_mtime < 60


def test_negative_age_is_refused(tmp_path):
    with pytest.raises(ValueError):
        open_store(str(tmp_path / "store")).remove_stale_staging(-1)


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a")
    (root / "sub" / "b.txt").write_bytes(b"b")
    return root
