"""The artifact store's contract, on the local backend and on a real S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llm_assets.store import (
    ArtifactCorruptError,
    ArtifactManifest,
    ArtifactNotFoundError,
    ArtifactStore,
    InvalidKeyError,
    backends,
    index_key,
    open_store,
    validate_relpath,
)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_round_trip_and_content_address(any_store: ArtifactStore, tmp_path):
    src = make_tree(tmp_path / "a", {"model/config.json": b"{}", "weights.bin": os.urandom(100_000)})
    ref = any_store.put_dir(src)
    assert any_store.exists(ref.sha256)
    assert ref.files == 2 and ref.bytes == 100_002
    assert ref.sha256 == ArtifactManifest.of_directory(src).sha256
    local = any_store.local_dir(ref.sha256, verify=True)
    assert (local / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert any_store.read_bytes(ref.sha256, "model/config.json") == b"{}"
    # The manifest is the identity: it lists every file with its hash, and hashes to the name.
    manifest = any_store.manifest(ref.sha256)
    assert [f.path for f in manifest.files] == ["model/config.json", "weights.bin"]


def test_same_content_same_hash_different_content_different_hash(any_store, tmp_path):
    one = any_store.put_dir(make_tree(tmp_path / "1", {"x": b"abc", "y/z": b"def"}))
    two = any_store.put_dir(make_tree(tmp_path / "2", {"y/z": b"def", "x": b"abc"}))
    three = any_store.put_dir(make_tree(tmp_path / "3", {"x": b"abd", "y/z": b"def"}))
    renamed = any_store.put_dir(make_tree(tmp_path / "4", {"x2": b"abc", "y/z": b"def"}))
    assert one.sha256 == two.sha256
    assert len({one.sha256, three.sha256, renamed.sha256}) == 3


def test_verify_names_the_flipped_file(any_store, tmp_path):
    ref = any_store.put_dir(make_tree(tmp_path / "a", {"good.txt": b"fine", "data/shard.bin": b"\x00" * 4096}))
    flip_byte(any_store, ref.sha256, "data/shard.bin", offset=100)
    report = any_store.verify(ref.sha256)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith("data/shard.bin: sha256")
    with pytest.raises(ArtifactCorruptError, match="data/shard.bin"):
        any_store.local_dir(ref.sha256, verify=True)


def flip_byte(store: ArtifactStore, artifact_hash: str, relpath: str, offset: int = 0) -> None:
    """Corrupt one stored byte behind the store's back, the way a bad disk or a bad hand would."""
    backend = store.backend
    if hasattr(backend, "root"):
        path = backend.root / "objects" / artifact_hash / "files" / relpath
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        key = backend._key(f"objects/{artifact_hash}/files/{relpath}")
        data = bytearray(backend.client.get_object(Bucket=backend.bucket, Key=key)["Body"].read())
        data[offset] ^= 0xFF
        backend.client.put_object(Bucket=backend.bucket, Key=key, Body=bytes(data))


def test_missing_and_unexpected_files_are_reported(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ref = store.put_dir(make_tree(tmp_path / "a", {"a.txt": b"1", "b.txt": b"2"}))
    files = store.backend.root / "objects" / ref.sha256 / "files"
    (files / "a.txt").unlink()
    (files / "intruder.txt").write_bytes(b"x")
    problems = store.verify(ref.sha256).problems
    assert "a.txt: missing" in problems
    assert "intruder.txt: not in the manifest" in problems


def test_corrupt_object_is_replaced_by_a_fresh_write(any_store, tmp_path):
    src = make_tree(tmp_path / "a", {"w.bin": b"\x01" * 1000})
    ref = any_store.put_dir(src)
    flip_byte(any_store, ref.sha256, "w.bin")
    assert not any_store.verify(ref.sha256).ok
    again = any_store.put_dir(src)
    assert again.sha256 == ref.sha256
    assert any_store.verify(ref.sha256).ok


def test_unknown_hash_is_a_clear_error(any_store):
    missing = "0" * 64
    assert not any_store.exists(missing)
    with pytest.raises(ArtifactNotFoundError, match="rematerialize"):
        any_store.manifest(missing)
    assert not any_store.verify(missing).ok


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "/abs/path", "a/../../b", "a//b", "./a", "a\\b", "C:/x", "", "a/\x00"]
)
def test_unsafe_file_paths_are_refused(bad):
    with pytest.raises(InvalidKeyError):
        validate_relpath(bad)


@pytest.mark.parametrize("asset", ["../x", "a/../b", "/abs", "a b", ""])
def test_unsafe_index_keys_are_refused(asset):
    with pytest.raises(InvalidKeyError):
        index_key(asset, None, "a" * 64)


def test_hash_and_manifest_paths_are_validated(any_store):
    with pytest.raises(InvalidKeyError):
        any_store.manifest("../../etc")
    bad_manifest = json.dumps({"format": 1, "files": [{"path": "../x", "sha256": "a" * 64, "bytes": 1}]})
    with pytest.raises(Exception, match="path traversal"):
        ArtifactManifest.from_bytes(bad_manifest.encode())


def test_symlinks_are_refused(tmp_path):
    store = open_store(str(tmp_path / "store"))
    src = make_tree(tmp_path / "a", {"real.txt": b"x"})
    (src / "link.txt").symlink_to(src / "real.txt")
    with pytest.raises(InvalidKeyError, match="symbolic link"):
        store.put_dir(src)


def test_partition_keys_are_encoded_not_trusted():
    key = index_key("raw_corpus", "../../evil/part", "b" * 64)
    assert ".." not in key.split("/")
    assert key.startswith("index/raw_corpus/p=")


def test_index_maps_fingerprints_to_artifacts(any_store, tmp_path):
    ref = any_store.put_dir(make_tree(tmp_path / "a", {"x": b"1"}))
    fp = "c" * 64
    assert any_store.index_lookup("raw_corpus", "shard-1", fp) is None
    any_store.index_record("raw_corpus", "shard-1", fp, ref.sha256, {"rows": 3})
    entry = any_store.index_lookup("raw_corpus", "shard-1", fp)
    assert entry == {"artifact": ref.sha256, "metadata": {"rows": 3}}
    assert any_store.index_lookup("raw_corpus", "shard-2", fp) is None


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from llm_assets.store import ArtifactManifest, open_store
    import boto3

    uri, src = sys.argv[1], Path(sys.argv[2])
    client = boto3.client("s3", endpoint_url=sys.argv[3]) if uri.startswith("s3://") else None
    store = open_store(uri, s3_client=client)
    print("HASH", ArtifactManifest.of_directory(src).sha256, flush=True)

    def progress(path, done, total):
        print("WROTE", path, flush=True)
        time.sleep(0.2)  # a slow disk: plenty of time to be killed between files

    store.put_dir(src, progress=progress)
    print("DONE", flush=True)
    """
)


def test_writer_killed_mid_write_leaves_nothing_visible(any_store, tmp_path, request):
    src = make_tree(tmp_path / "big", {f"part-{i:02d}.bin": os.urandom(256_000) for i in range(20)})
    backend = any_store.backend
    if hasattr(backend, "root"):
        uri, endpoint = str(backend.root), ""
    else:
        uri, endpoint = f"s3://{backend.bucket}/{backend.prefix}", backend.client.meta.endpoint_url
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, uri, str(src), endpoint],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    artifact_hash = proc.stdout.readline().split()[1]
    written = 0
    for line in proc.stdout:
        if line.startswith("WROTE"):
            written += 1
            if written == 5:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"

    # Some files were written, yet no reader sees an object: no manifest was committed.
    assert not any_store.exists(artifact_hash)
    assert not any_store.verify(artifact_hash).ok
    if hasattr(backend, "root"):
        assert not (backend.root / "objects" / artifact_hash).exists()
        assert any((backend.root / "tmp").iterdir()), "staging debris is expected, and invisible"
    else:
        assert any_store.backend.list_object_files(artifact_hash), "uploaded files without a manifest"

    # A later writer of the same content commits normally over the debris.
    ref = any_store.put_dir(src)
    assert ref.sha256 == artifact_hash and any_store.verify(artifact_hash).ok


def test_an_object_verified_in_full_is_rehashed_only_once_a_file_changes(any_store, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "SETTLE_NS", 0)  # the files need not age first
    ref = any_store.put_dir(make_tree(tmp_path / "a", {"a.txt": b"one", "data/b.bin": b"\x00" * 4096}))
    hashed = []
    full = any_store.verify
    monkeypatch.setattr(any_store, "verify", lambda h: hashed.append(h) or full(h))
    assert any_store.verify_unless_unchanged(ref.sha256).ok
    assert any_store.verify_unless_unchanged(ref.sha256).ok
    assert hashed == [ref.sha256], "the second answer comes from the record"
    time.sleep(0.05)  # past a tick of the file system's clock
    flip_byte(any_store, ref.sha256, "data/b.bin")
    report = any_store.verify_unless_unchanged(ref.sha256)
    assert not report.ok and report.problems[0].startswith("data/b.bin: sha256") and len(hashed) == 2


def test_a_file_changed_just_now_is_always_rehashed(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ref = store.put_dir(make_tree(tmp_path / "a", {"a.txt": b"one"}))
    assert store.backend.file_signatures(ref.sha256) is None, "a write in the same clock tick could hide"
    assert store.verify_unless_unchanged(ref.sha256).ok
    assert store.backend.read_key(f"verified/{ref.sha256}.json") is None
