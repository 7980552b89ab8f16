"""The backends' raw key functions refuse every key that could leave the store's root."""

from __future__ import annotations

import pytest

from llm_assets.store import ArtifactStore, InvalidKeyError, S3Backend, open_store, validate_key

UNSAFE = ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a/.", "a\\b", "C:/x", "", "a/\x00b"]


@pytest.mark.parametrize("key", UNSAFE)
def test_validate_key_refuses_and_names_the_key(key):
    with pytest.raises(InvalidKeyError, match="store key") as exc:
        validate_key(key)
    assert repr(key) in str(exc.value)


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "index//x.json", "a\\..\\b", ""])
def test_backends_refuse_traversal_in_read_write_list(any_store: ArtifactStore, key, tmp_path):
    backend = any_store.backend
    with pytest.raises(InvalidKeyError) as exc:
        backend.read_key(key)
    assert repr(key) in str(exc.value)
    with pytest.raises(InvalidKeyError) as exc:
        backend.write_key(key, b"planted")
    assert repr(key) in str(exc.value)
    with pytest.raises(InvalidKeyError):
        backend.list_keys(key)
    with pytest.raises(InvalidKeyError):
        backend.list_keys(key + "/")
    # Nothing was written anywhere: not beside the store, not in the machine's root.
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert not any(p.read_bytes() == b"planted" for p in tmp_path.rglob("*") if p.is_file())


def test_local_backend_cannot_escape_its_root(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"do not read")
    store = open_store(str(tmp_path / "store"))
    for key in ("../secret.txt", str(outside), "index/../../secret.txt"):
        with pytest.raises(InvalidKeyError):
            store.backend.read_key(key)
        with pytest.raises(InvalidKeyError):
            store.backend.write_key(key, b"overwritten")
    with pytest.raises(InvalidKeyError):
        store.backend.list_keys("..")
    with pytest.raises(InvalidKeyError):
        store.backend.list_keys("/")
    assert outside.read_bytes() == b"do not read"


def test_safe_keys_still_work(any_store: ArtifactStore):
    backend = any_store.backend
    assert backend.read_key("releases/p=125M/current.json") is None
    backend.write_key("releases/p=125M/current.json", b"{}")
    backend.write_key("releases/p=125M/history/1.json", b"{}")
    assert backend.read_key("releases/p=125M/current.json") == b"{}"
    expected = ["releases/p=125M/current.json", "releases/p=125M/history/1.json"]
    assert backend.list_keys("releases/") == expected
    assert backend.list_keys("releases") == expected
    assert backend.list_keys("releases/p=125M/history/") == ["releases/p=125M/history/1.json"]
    assert backend.list_keys("nothing/") == []


@pytest.mark.parametrize("uri", ["s3://bucket/../x", "s3://bucket/a/../../b", "s3://bucket/a//b", "s3://bucket/a\\b"])
def test_s3_prefix_cannot_traverse(uri, tmp_path):
    with pytest.raises(InvalidKeyError, match="S3 store prefix"):
        open_store(uri, s3_client=object(), cache_dir=tmp_path)


def test_s3_bucket_name_is_validated(tmp_path):
    with pytest.raises(InvalidKeyError, match="bucket"):
        S3Backend(object(), "..", "llm", tmp_path)


class _ListingClient:
    """Just enough of a boto3 client to list a bucket that holds keys AWS S3 accepts but SeaweedFS
    refuses (it rejects '..' and '.' segments itself): what another tool may have written."""

    def __init__(self, keys: list[str]):
        self.keys = keys

    def get_paginator(self, name: str):
        assert name == "list_objects_v2"
        keys = self.keys

        class Paginator:
            def paginate(self, Bucket: str, Prefix: str):  # noqa: N803 (boto3's argument names)
                yield {"Contents": [{"Key": key} for key in keys if key.startswith(Prefix)]}

        return Paginator()


def test_s3_listing_leaves_out_keys_the_store_could_not_address(tmp_path):
    client = _ListingClient(["llm/overrides/good.json", "llm/overrides/../escape.json", "llm/overrides/./dot.json"])
    store = open_store("s3://bucket/llm", s3_client=client, cache_dir=tmp_path / "cache")
    assert store.backend.list_keys("overrides/") == ["overrides/good.json"]
    # verify() still reports every stray file of an object, however it is named (none is opened).
    sha = "a" * 64
    client.keys = [f"llm/objects/{sha}/files/ok.bin", f"llm/objects/{sha}/files/../x"]
    assert store.backend.list_object_files(sha) == ["../x", "ok.bin"]
