"""The S3 backend's local cache: where it lives, and that a copy in it is checked before use."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from llm_assets.store import (
    ArtifactCorruptError,
    ArtifactStore,
    ArtifactStoreError,
    default_s3_cache_dir,
    hash_file,
    open_store,
)
from llm_assets.store import cache as cache_module

FILES = {"config.json": b'{"n_layer": 2}', "model.safetensors": bytes(range(256)) * 64, "tok/vocab.txt": b"a\nb\n"}


def s3_store(s3_client, s3_bucket, cache_dir: Path | None) -> ArtifactStore:
    return open_store(f"s3://{s3_bucket}/llm", s3_client=s3_client, cache_dir=cache_dir)


def put(store: ArtifactStore, tmp_path: Path, files: dict[str, bytes] = FILES) -> str:
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return store.put_dir(src).sha256


@pytest.fixture
def store(s3_client, s3_bucket, tmp_path) -> ArtifactStore:
    return s3_store(s3_client, s3_bucket, tmp_path / "cache")


# -- where the cache lives -------------------------------------------------------------------------

def test_default_cache_is_per_user_under_xdg_cache_home(s3_client, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = s3_store(s3_client, s3_bucket, None)
    assert store.cache_dir == tmp_path / "xdg" / "llm-assets" / s3_bucket / "llm"
    sha = put(store, tmp_path)
    local = store.local_dir(sha, verify=True)
    assert local == store.cache_dir / sha and (local / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    for folder in (tmp_path / "xdg" / "llm-assets", store.cache_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_default_cache_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "llm-assets" / "bucket" / "team%2Fllm"
    assert default_s3_cache_dir("bucket", "team/llm") == expected
    assert default_s3_cache_dir("bucket", "").name == "%2F"  # a bucket's root: never a folder another prefix uses


def test_a_default_cache_others_can_write_to_is_refused(s3_client, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "llm-assets").mkdir(parents=True)
    os.chmod(tmp_path / "xdg" / "llm-assets", 0o777)
    store = s3_store(s3_client, s3_bucket, None)
    sha = put(store, tmp_path)
    with pytest.raises(ArtifactStoreError, match="not private to this user.*LLM_ASSETS_CACHE_DIR"):
        store.local_dir(sha)


def test_configured_cache_dir_comes_from_settings(monkeypatch, tmp_path):
    from llm_assets.settings import Settings, artifact_store_resource

    monkeypatch.setenv("LLM_ASSETS_STORE", "s3://bucket/llm")
    monkeypatch.setenv("LLM_ASSETS_CACHE_DIR", str(tmp_path / "shared-cache"))
    settings = Settings.from_env()
    assert settings.cache_dir == str(tmp_path / "shared-cache")
    resource = artifact_store_resource(settings)
    assert resource.cache_dir == str(tmp_path / "shared-cache")
    assert resource.for_child_process()[0]["cache_dir"] == str(tmp_path / "shared-cache")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert resource.get_store().cache_dir == tmp_path / "shared-cache"  # used as it is
    monkeypatch.delenv("LLM_ASSETS_CACHE_DIR")
    assert Settings.from_env().cache_dir is None


# -- a cached copy is checked before it is handed out ------------------------------------------------

def test_altered_cached_file_is_detected_by_verify_and_replaced(store, tmp_path, caplog):
    sha = put(store, tmp_path)
    local = store.local_dir(sha, verify=True)
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # same size: only hashing sees it
    weights.write_bytes(bytes(data))
    bad_sha = hash_file(weights)[0]
    good_sha = hash_file(tmp_path / "src" / "model.safetensors")[0]
    with caplog.at_level(logging.WARNING, logger="llm_assets.store.store"):
        again = store.local_dir(sha, verify=True)
    assert again == local and weights.read_bytes() == FILES["model.safetensors"]
    warning = caplog.text
    assert sha in warning and "model.safetensors" in warning and bad_sha in warning and good_sha in warning


@pytest.mark.parametrize("verify", [False, True])
def test_planted_file_in_cached_copy_is_detected(store, tmp_path, verify, caplog):
    sha = put(store, tmp_path)
    local = store.local_dir(sha)
    (local / "tok" / "extra.py").write_text("import os; os.system('rm -rf ~')")
    with caplog.at_level(logging.WARNING):
        assert store.local_dir(sha, verify=verify) == local
    assert not (local / "tok" / "extra.py").exists()
    assert "tok/extra.py: not in the manifest" in caplog.text
    assert store.cache.problems(sha, store.manifest(sha), full=True) == []


@pytest.mark.parametrize("damage", ["truncate", "delete", "symlink"])
def test_cheap_path_still_sees_a_changed_file_list_or_size(store, tmp_path, damage):
    sha = put(store, tmp_path)
    local = store.local_dir(sha)
    target = local / "config.json"
    if damage == "truncate":
        target.write_bytes(b"{}")
    elif damage == "delete":
        target.unlink()
    else:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_bytes(FILES["config.json"])  # the right bytes, but not a file of the copy
        target.unlink()
        target.symlink_to(elsewhere)
    assert store.local_dir(sha) == local
    assert not target.is_symlink() and target.read_bytes() == FILES["config.json"]


def test_corrupt_copy_that_cannot_be_replaced_is_refused_naming_file_and_hashes(store, tmp_path, monkeypatch):
    sha = put(store, tmp_path)
    local = store.local_dir(sha)
    (local / "config.json").write_bytes(b'{"n_layer": 9}')  # same size, different bytes
    bad_sha = hash_file(local / "config.json")[0]
    good_sha = store.manifest(sha).files[0].sha256
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src) == local:
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(cache_module.os, "rename", rename)
    with pytest.raises(ArtifactCorruptError) as exc:
        store.local_dir(sha, verify=True)
    message = str(exc.value)
    assert f"the local copy of artifact {sha}" in message
    assert f"config.json: sha256 {bad_sha}" in message and good_sha in message
    assert "remove it" in message and str(local) in message


def test_remote_corruption_fails_verify_even_with_a_good_cached_copy(store, tmp_path):
    sha = put(store, tmp_path)
    store.local_dir(sha, verify=True)
    backend = store.backend
    key = backend._key(f"objects/{sha}/files/tok/vocab.txt")
    backend.client.put_object(Bucket=backend.bucket, Key=key, Body=b"a\nc\n")
    with pytest.raises(ArtifactCorruptError, match=f"{sha}.*tok/vocab.txt: sha256"):
        store.local_dir(sha, verify=True)
    assert store.local_dir(sha) == store.cache_dir / sha  # the cheap path reads the good local copy


def test_first_download_with_verify_reports_stray_remote_files(store, tmp_path):
    sha = put(store, tmp_path)
    backend = store.backend
    backend.client.put_object(Bucket=backend.bucket, Key=backend._key(f"objects/{sha}/files/intruder.bin"), Body=b"x")
    with pytest.raises(ArtifactCorruptError, match="intruder.bin: not in the manifest"):
        store.local_dir(sha, verify=True)
    assert not (store.cache_dir / sha).exists(), "a refused download never appears in the cache"
    assert not any((store.cache_dir / "tmp").iterdir()), "nor leaves staging behind"


def test_a_copy_filled_by_another_reader_is_kept(store, tmp_path):
    sha = put(store, tmp_path)
    local = store.local_dir(sha)
    assert store.cache.fill(store.backend, sha, store.manifest(sha), check_extras=False) is False
    assert store.local_dir(sha, verify=True) == local
    assert not any((store.cache_dir / "tmp").iterdir())
