"""File sources: formats, chunking, and every kind of bad input named or counted, never lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.data import file_sources
from llm_assets.data.documents import ReadStats, SourceError
from llm_assets.manifest import IngestRecipe, LocalSource, S3Source


def local(tmp_path: Path, pattern: str = "*", **fields) -> LocalSource:
    return LocalSource(kind="local", name="mine", paths=[str(tmp_path / pattern)], **fields)


def read_all(source, recipe=IngestRecipe(), client=None):
    stats = ReadStats()
    docs = [d for shard in file_sources.discover(source, recipe, client)
            for d in file_sources.read(shard, source, recipe, stats, client)]
    return docs, stats


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_text_html_and_parquet(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "first doc", "meta": 1}, {"text": "second doc"}])
    (tmp_path / "b.txt").write_text("plain text\nwith lines\n")
    (tmp_path / "c.html").write_text("<html><body><p>hello</p></body></html>")
    pq.write_table(pa.table({"text": ["row zero", "row one"], "doc": ["x", "y"]}), tmp_path / "d.parquet")
    docs, stats = read_all(local(tmp_path))
    assert [(d.text, d.kind) for d in docs] == [
        ("first doc", "text"), ("second doc", "text"), ("plain text\nwith lines\n", "text"),
        ("<html><body><p>hello</p></body></html>", "html"), ("row zero", "text"), ("row one", "text"),
    ]
    assert docs[0].uri == "local://mine/a.jsonl@0" and docs[4].id == "mine:d.parquet#row0"
    assert stats.files == 4 and stats.decode_errors == 0


def test_ids_from_a_field(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"body": "t", "key": 42}])
    docs, _ = read_all(local(tmp_path, text_field="body", id_field="key"))
    assert docs[0].id == "mine:42"


def test_malformed_line_names_file_and_line(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "broken', {"text": "ok"}])
    with pytest.raises(SourceError, match=r"mine:a\.jsonl:line 3: not valid JSON .*malformed_records: quarantine"):
        read_all(local(tmp_path))


def test_missing_field_names_the_fields_present(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(SourceError, match=r"a\.jsonl:line 2: record has no 'text' field \(fields: content\)"):
        read_all(local(tmp_path))


def test_quarantine_keeps_bad_records_aside(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "not json", [1, 2], {"text": 5}, {"text": "fine"}])
    docs, stats = read_all(local(tmp_path), IngestRecipe(malformed_records="quarantine"))
    assert [d.text for d in docs] == ["ok", "fine"]
    assert [(q["where"], q["reason"].split(" (")[0]) for q in stats.quarantined] == [
        ("line 2", "not valid JSON"), ("line 3", "expected a JSON object, found list"),
        ("line 4", "field 'text' is int, not a string"),
    ]


def test_invalid_utf8_is_repaired_or_dropped_never_a_crash(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "bad \xff\xfe byte"}\n{"text": "lone \\ud800 surrogate"}\n')
    docs, stats = read_all(local(tmp_path))
    assert [d.text for d in docs] == ["good", "bad \ufffd\ufffd byte", "lone \ufffd surrogate"]
    assert stats.decode_errors == 2
    docs, stats = read_all(local(tmp_path), IngestRecipe(invalid_utf8="drop"))
    assert [d.text for d in docs] == ["good"] and stats.dropped_undecodable == 2


def test_binary_and_empty_files_are_skipped_and_named(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x7fELF\x00\x01\x02" + os.urandom(100))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "real.txt").write_text("words")
    docs, stats = read_all(local(tmp_path))
    assert [d.text for d in docs] == ["words"]
    assert stats.binary_files == ["blob.txt"] and stats.empty_files == 1


def test_missing_paths_and_unknown_formats_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match=r"'mine': '.*nothing/\*\.jsonl' matches no files"):
        file_sources.discover(local(tmp_path, "nothing/*.jsonl"), IngestRecipe())
    (tmp_path / "data.bin").write_text("x")
    with pytest.raises(SourceError, match=r"cannot tell the format of 'data.bin'.*set format:"):
        read_all(local(tmp_path))
    docs, _ = read_all(local(tmp_path, format="text"))
    assert docs[0].text == "x"


def test_parquet_errors_name_the_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(SourceError, match=r"d\.parquet: no column 'text' \(columns: body\)"):
        read_all(local(tmp_path))
    (tmp_path / "d.parquet").write_text("not parquet at all")
    with pytest.raises(SourceError, match="not a readable parquet file"):
        read_all(local(tmp_path))


def test_an_outsized_document_is_split_at_line_boundaries(tmp_path):
    big = "".join(f"line {i} " + "x" * 80 + "\n" for i in range(2000))
    jsonl(tmp_path / "a.jsonl", [{"text": "small"}, {"text": big}])
    docs, stats = read_all(local(tmp_path), IngestRecipe(max_doc_bytes=10_000))
    parts = [d for d in docs if d.text != "small"]
    assert len(parts) > 10 and "".join(p.text for p in parts) == big
    assert all(len(p.text.encode()) <= 10_000 for p in parts) and stats.split_documents == 1


def test_large_files_are_chunked_and_every_line_is_read_exactly_once(tmp_path):
    records = [{"text": f"doc {i} " + "y" * (i % 97)} for i in range(3000)]
    jsonl(tmp_path / "big.jsonl", records)
    recipe = IngestRecipe(chunk_mb=0.01)  # 10 kB chunks
    shards = file_sources.discover(local(tmp_path), recipe)
    assert len(shards) > 10 and shards[1].key == "mine-big.jsonl@0001"
    docs, _ = read_all(local(tmp_path), recipe)
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert len({d.id for d in docs}) == len(records)


def test_line_numbers_are_absolute_inside_later_chunks(tmp_path):
    records = [{"text": f"doc {i}"} for i in range(2000)]
    records[1500] = "{broken"
    jsonl(tmp_path / "big.jsonl", records)
    with pytest.raises(SourceError, match=r"big\.jsonl:line 1501:"):
        read_all(local(tmp_path), IngestRecipe(chunk_mb=0.005))


def test_s3_prefix_reads_like_local(tmp_path, s3_client, s3_bucket, seaweedfs):
    records = [{"text": f"s3 doc {i}"} for i in range(500)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    s3_client.put_object(Bucket=s3_bucket, Key="corpus/part-1.jsonl", Body=body)
    s3_client.put_object(Bucket=s3_bucket, Key="corpus/notes.txt", Body=b"a note")
    s3_client.put_object(Bucket=s3_bucket, Key="other/skip.jsonl", Body=b'{"text": "no"}\n')
    source = S3Source(kind="s3", name="remote", uri=f"s3://{s3_bucket}/corpus", endpoint_url=seaweedfs)
    recipe = IngestRecipe(chunk_mb=0.002)
    docs, stats = read_all(source, recipe, s3_client)
    assert [d.text for d in docs] == ["a note"] + [r["text"] for r in records]
    assert docs[1].uri == f"s3://{s3_bucket}/corpus/part-1.jsonl@0"
    with pytest.raises(SourceError, match="no object under"):
        file_sources.discover(source.model_copy(update={"pattern": "*.parquet"}), recipe, s3_client)


READ_ONE_CHUNK = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from llm_assets.data import file_sources
    from llm_assets.data.documents import ReadStats
    from llm_assets.manifest import IngestRecipe, LocalSource

    source = LocalSource(kind="local", name="big", paths=[sys.argv[1]])
    recipe = IngestRecipe(chunk_mb=8)
    shards = file_sources.discover(source, recipe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(1 for _ in file_sources.read(shards[len(shards) // 2], source, recipe, ReadStats()))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(shards), n, (after - before) // 1024)
    """
)


def test_a_large_file_is_streamed_in_bounded_memory(tmp_path):
    """A 160 MB JSONL read one 8 MB chunk at a time: memory grows by far less than the file."""
    line = (json.dumps({"text": "z" * 1000}) + "\n").encode()
    with open(tmp_path / "big.jsonl", "wb") as handle:
        for _ in range(160):
            handle.write(line * 1000)
    out = subprocess.run(
        [sys.executable, "-c", READ_ONE_CHUNK, str(tmp_path / "big.jsonl")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    shards, docs, grew_mb = map(int, out)
    assert shards == 21 and 7000 < docs < 9000
    assert grew_mb < 40, f"reading one chunk grew memory by {grew_mb} MB"
