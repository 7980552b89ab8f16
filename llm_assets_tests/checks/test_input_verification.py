"""Every step verifies what it reads: an input whose stored files no longer match the hash its
parent's materialization recorded fails the step before anything is built, naming the input, the
file and both hashes, and nothing new is recorded. (The hash gates re-check what a step wrote.)"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from tokenizers import Tokenizer

from llm_assets.artifacts import InputRead, input_problems, verify_inputs
from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.store import ArtifactManifest, ArtifactStore, hash_file, index_key, open_store
from llm_assets_tests.store.test_store import flip_byte, make_tree


def quiet(_: str) -> None:
    pass


def current(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def materialization_count(instance: dg.DagsterInstance, asset: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records)


def failures(instance: dg.DagsterInstance, run_ids: list[str]) -> str:
    """The descriptions of every failed step of the runs (a dg.Failure's, else the error's)."""
    found = []
    for run_id in run_ids:
        for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            data = record.dagster_event.step_failure_data
            found.append(data.user_failure_data.description if data.user_failure_data else data.error.message)
    return "\n".join(found)


def objects(store_uri: str) -> set[str]:
    return {p.name for p in (Path(store_uri) / "objects").iterdir()}


def expected_digest(store: ArtifactStore, sha: str, relpath: str) -> str:
    return next(f.sha256 for f in store.manifest(sha).files if f.path == relpath)


# -- the verifier on its own ------------------------------------------------------------------


def test_a_read_is_checked_against_the_recorded_hash_file_by_file(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ref = store.put_dir(make_tree(tmp_path / "src", {"a.bin": b"a" * 5000, "part/b.txt": b"beta"}))
    assert input_problems(store, InputRead("parent", "p1", ref.sha256)) == ([], 5004)

    flip_byte(store, ref.sha256, "a.bin", offset=3)
    actual = hash_file(store.local_dir(ref.sha256) / "a.bin")[0]
    (problem,), hashed = input_problems(store, InputRead("parent", "p1", ref.sha256))
    assert hashed == 5004 and problem["input"] == "parent[p1]" and problem["file"] == "a.bin"
    assert problem["expected_sha256"] == hashlib.sha256(b"a" * 5000).hexdigest() and problem["actual_sha256"] == actual
    # A step reading only another part of the artifact is not held by a file it never reads.
    assert input_problems(store, InputRead("parent", "p1", ref.sha256, ("part/b.txt",))) == ([], 4)
    assert input_problems(store, InputRead("parent", "p1", ref.sha256, ())) == ([], 0)

    with pytest.raises(dg.Failure) as failed:
        verify_inputs(store, "child[p1]", [InputRead("parent", "p1", ref.sha256)])
    text = failed.value.description
    assert text.startswith("child[p1] did not run: 1 file(s)")
    assert f"parent[p1] {ref.sha256[:12]}: a.bin: expected sha256 {problem['expected_sha256']}" in text
    assert f"actual {actual}" in text and "llm-assets verify" in text and "key:parent" in text

    # A file the manifest does not list, in an artifact read whole (a step may glob it).
    (store.local_dir(ref.sha256) / "part" / "stray.txt").write_text("not mine")
    found, _ = input_problems(store, InputRead("parent", None, ref.sha256, ("part/b.txt",)))
    assert found == []
    found, _ = input_problems(store, InputRead("parent", None, ref.sha256))
    assert {p["file"] for p in found} == {"a.bin", "part/stray.txt"}

    # The manifest itself must hash to the recorded hash: one "fixed" to match the corrupt file does not.
    manifest = Path(store.backend.root) / "objects" / ref.sha256 / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace(problem["expected_sha256"], actual))
    (problem,), _ = input_problems(store, InputRead("parent", None, ref.sha256, ()))
    assert problem["file"] == "MANIFEST.json" and problem["expected_sha256"] == ref.sha256
    assert problem["actual_sha256"] == ArtifactManifest.from_bytes(manifest.read_bytes()).sha256 != ref.sha256
    (gone,), _ = input_problems(store, InputRead("parent", None, "0" * 64))
    assert gone["problem"] == "the artifact is not in the store"


def test_on_s3_what_is_read_is_verified_the_download_and_the_cache(s3_client, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/llm", s3_client=s3_client, cache_dir=tmp_path / "cache")
    ref = store.put_dir(make_tree(tmp_path / "src", {"w.bin": b"w" * 4096, "c.json": b"{}"}))
    assert input_problems(store, InputRead("parent", None, ref.sha256)) == ([], 4098)  # downloaded into the cache
    # The step reads the cached copy: a corrupt cache is caught.
    cached = store.local_dir(ref.sha256) / "c.json"
    cached.write_bytes(b"[]")
    (problem,), _ = input_problems(store, InputRead("parent", None, ref.sha256))
    assert problem["file"] == "c.json" and problem["actual_sha256"] == hashlib.sha256(b"[]").hexdigest()
    # A corrupt stored copy is refused on download, with what it held.
    flip_byte(store, ref.sha256, "w.bin", offset=7)
    fresh = ArtifactStore(store.backend, tmp_path / "fresh-cache")
    (problem,), _ = input_problems(fresh, InputRead("parent", None, ref.sha256))
    corrupt = bytearray(b"w" * 4096)
    corrupt[7] ^= 0xFF
    assert problem["file"] == "w.bin" and problem["expected_sha256"] == hashlib.sha256(b"w" * 4096).hexdigest()
    assert problem["actual_sha256"] == hashlib.sha256(bytes(corrupt)).hexdigest()


# -- steps on a real instance -------------------------------------------------------------------


def change_one_digit(path: Path, token: str) -> None:
    """Change one digit of `token`'s id in a tokenizer.json, to an id no other token has: the file
    still loads, and encodes that token differently."""
    text = path.read_text(encoding="utf-8")
    vocab = json.loads(text)["model"]["vocab"]
    old = str(vocab[token])
    new = next(candidate for i in range(len(old)) for digit in "0123456789"
               if (candidate := old[:i] + digit + old[i + 1:]) != old and not candidate.startswith("0")
               and int(candidate) not in set(vocab.values()))
    key = re.escape(json.dumps(token, ensure_ascii=False))
    changed, count = re.subn(rf"({key}\s*:\s*){old}\b", rf"\g<1>{new}", text, count=1)
    assert count == 1
    path.write_text(changed, encoding="utf-8")


@pytest.fixture
def tokenizing_defs(settings, manifest_path) -> dg.Definitions:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"]["tokenizer"] = {"vocab_size": 320, "sample_mb": 0.3}
    manifest_path.write_text(yaml.safe_dump(manifest))
    return build_definitions(settings)


def test_a_changed_digit_in_the_stored_tokenizer_fails_token_shards(tokenizing_defs, instance, settings):
    defs = tokenizing_defs
    assert materialize_graph(defs, instance, selection="+key:token_shards", log=quiet).success
    store = open_store(settings.store_uri)
    tokenizer_sha = current(instance, "tokenizer")["sha256"]
    path = store.local_dir(tokenizer_sha) / "tokenizer.json"
    original = Tokenizer.from_file(str(path))
    the = original.encode(" the")
    change_one_digit(path, original.id_to_token(the.ids[0]))
    assert Tokenizer.from_file(str(path)).encode(" the").ids != the.ids, "it loads, and encodes ' the' differently"
    expected, actual = expected_digest(store, tokenizer_sha, "tokenizer.json"), hash_file(path)[0]

    # A cache hit reads no input: the shards already built from the good tokenizer stay current.
    cached = materialize_graph(defs, instance, selection="key:token_shards", log=quiet)
    assert cached.success and cached.outcomes and all(o.cache_hit for o in cached.outcomes)

    # Their index entries gone, they must be rebuilt: from the corrupt tokenizer, never.
    shutil.rmtree(Path(settings.store_uri, index_key("token_shards", None, "0" * 64)).parent.parent)
    shards = materialization_count(instance, "token_shards")
    before = objects(settings.store_uri)
    result = materialize_graph(defs, instance, selection="key:token_shards", log=quiet)
    assert not result.success and result.outcomes == []
    text = failures(instance, result.failed_runs)
    assert "token_shards[" in text and "did not run" in text
    assert f"tokenizer {tokenizer_sha[:12]}: tokenizer.json: expected sha256 {expected} (its manifest), " \
           f"actual {actual}" in text
    assert "llm-assets verify" in text and "key:tokenizer" in text
    assert materialization_count(instance, "token_shards") == shards, "no new token_shards materialization"
    assert objects(settings.store_uri) == before, "no new artifact"
    index = Path(settings.store_uri, index_key("token_shards", None, "0" * 64)).parent.parent
    assert not index.exists() or not any(index.rglob("*.json")), "nothing recorded under a fingerprint"
    staging = Path(settings.store_uri, "tmp")
    assert not staging.exists() or not any(staging.iterdir()), "nothing half-written left behind"


def test_a_corrupt_raw_shard_fails_its_clean_corpus_partition_only(defs, instance, settings):
    assert materialize_graph(defs, instance, selection="key:raw_corpus", log=quiet).success
    bad, *good = instance.get_dynamic_partitions("corpus_shards")
    store = open_store(settings.store_uri)
    raw_sha = current(instance, "raw_corpus", bad)["sha256"]
    flip_byte(store, raw_sha, "shard.parquet", offset=99)
    expected = expected_digest(store, raw_sha, "shard.parquet")
    actual = hash_file(store.local_dir(raw_sha) / "shard.parquet")[0]

    result = materialize_graph(defs, instance, selection="key:clean_corpus", log=quiet)
    assert not result.success and len(result.failed_runs) == 1
    assert sorted(o.partition for o in result.outcomes) == sorted(good), "the clean shards went on"
    text = failures(instance, result.failed_runs)
    assert f"clean_corpus[{bad}] did not run" in text
    assert f"raw_corpus[{bad}] {raw_sha[:12]}: shard.parquet: expected sha256 {expected} (its manifest), " \
           f"actual {actual}" in text
    assert instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("clean_corpus"), asset_partitions=[bad]), limit=1
    ).records == []

    # The remedy it names: rematerialize the parent (its corrupt copy is rebuilt), then the step.
    assert materialize_graph(defs, instance, selection="key:raw_corpus", log=quiet).success
    assert store.verify(raw_sha).ok
    again = materialize_graph(defs, instance, selection="key:clean_corpus", log=quiet)
    assert again.success and {o.partition for o in again.outcomes if not o.cache_hit} == {bad}
