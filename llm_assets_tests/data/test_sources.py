"""Sources that cannot be listed, partitions no source produces, and over-long lines."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest
import yaml

from llm_assets.data import file_sources, stdlib_source
from llm_assets.data.documents import ReadStats, SourceError, UnknownShardError, split_lines
from llm_assets.data.sources import (
    SourceListingError,
    classify_partitions,
    discover,
    discover_sources,
    find_shard,
)
from llm_assets.manifest import IngestRecipe, LocalSource, load_manifest
from llm_assets_tests.conftest import TEST_MANIFEST


def with_sources(manifest_path: Path, *extra: dict, **fields) -> Path:
    manifest = {**TEST_MANIFEST, **fields}
    manifest["sources"] = [{**TEST_MANIFEST["sources"][0], "include": ["json/*"]}, *extra]
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return manifest_path


def source_line(manifest_path: Path, name: str) -> int:
    lines = manifest_path.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if text.lstrip("- ").startswith(f"name: {name}")) - 1


# -- sources that cannot be listed --------------------------------------------------------
def test_a_glob_that_matches_nothing_is_one_line_naming_the_source_and_its_manifest_line(manifest_path, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a document")
    path = with_sources(manifest_path, {"kind": "local", "name": "web", "paths": ["crawl/*.jsonl"]},
                        {"kind": "local", "name": "docs", "paths": ["docs/*.txt"]})
    manifest = load_manifest(path)
    found = discover_sources(manifest)
    assert {s.source for s in found.shards} == {"stdlib", "docs"}, "the healthy sources are still listed"
    [problem] = found.problems
    assert problem.source == "web" and "\n" not in problem.message
    assert problem.message.startswith(f"{path}:{source_line(path, 'web')}: source 'web': ")
    assert f"'{tmp_path}/crawl/*.jsonl' matches no files" in problem.message
    assert "on_source_error: skip" in problem.message
    # stop (the default): discover raises, one line per bad source; skip: the healthy shards.
    with pytest.raises(SourceListingError) as err:
        discover(manifest)
    assert str(err.value) == problem.message and isinstance(err.value, SourceError)
    skipping = load_manifest(with_sources(manifest_path, {"kind": "local", "name": "web", "paths": ["crawl/*"]},
                                          {"kind": "local", "name": "docs", "paths": ["docs/*.txt"]},
                                          on_source_error="skip"))
    assert [s.key for s in discover(skipping)] == [s.key for s in found.shards]
    # A shard of a healthy source is found, whatever the state of the others.
    assert find_shard(manifest, "docs-a.txt").items[0].relpath == "a.txt"
    with pytest.raises(SourceListingError, match=r"source 'web'"):
        find_shard(manifest, "web-page.jsonl")


def test_a_missing_path_and_an_unmatched_stdlib_include_are_named(manifest_path, tmp_path):
    missing = LocalSource(kind="local", name="mine", paths=[str(tmp_path / "corpus.jsonl")])
    with pytest.raises(SourceError, match=r"'mine': '.*corpus\.jsonl' does not exist; check sources\[\]\.paths"):
        file_sources.discover(missing, IngestRecipe())
    folder = LocalSource(kind="local", name="mine", paths=[str(tmp_path)])
    with pytest.raises(SourceError, match=r"is a folder, not a file \(add a glob"):
        file_sources.discover(folder, IngestRecipe())
    path = with_sources(manifest_path)
    manifest = yaml.safe_load(path.read_text())
    manifest["sources"][0]["include"] = ["json/*", "jsno/*"]
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    [problem] = discover_sources(load_manifest(path)).problems
    assert problem.message.startswith(f"{path}:{source_line(path, 'stdlib')}: source 'stdlib': include 'jsno/*' "
                                      "matches no file of the standard library")
    # A stdlib include that matches keeps its shards exactly as before.
    source = load_manifest(with_sources(manifest_path)).sources[0]
    assert [i.relpath for s in stdlib_source.discover(source) for i in s.items][:2] == [
        "json/__init__.py", "json/decoder.py"]


def test_partitions_no_source_produces_are_told_apart_from_those_of_a_failing_source(manifest_path, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a document")
    path = with_sources(manifest_path, {"kind": "local", "name": "docs", "paths": ["docs/*.txt"]},
                        {"kind": "local", "name": "web", "paths": ["crawl/*.jsonl"]}, on_source_error="skip")
    manifest = load_manifest(path)
    found = discover_sources(manifest)
    existing = [s.key for s in found.shards] + ["docs-gone.txt", "old-a.jsonl", "web-page.jsonl", "stdlib-0009"]
    stale, unlisted = classify_partitions(manifest, found, existing)
    assert unlisted == ["web-page.jsonl"], "its source cannot be listed: nothing says the shard is gone"
    assert [(p.key, p.reason.split(" (")[0]) for p in stale] == [
        ("docs-gone.txt", "source 'docs' no longer produces it"),
        ("old-a.jsonl", "no source in the manifest produces it"),
        ("stdlib-0009", "source 'stdlib' no longer produces it"),
    ]
    with pytest.raises(UnknownShardError, match=r"'old-a\.jsonl' is not produced by any source .* "
                                                r"`llm-assets partitions prune`"):
        find_shard(manifest, "old-a.jsonl")


# -- over-long lines ----------------------------------------------------------------------
def split_lines_before(text: str, max_bytes: int) -> list[str]:
    """split_lines as it was before over-long lines were cut: the reference for every text it handled."""
    if len(text.encode()) <= max_bytes:
        return [text]
    parts, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if current and size + n > max_bytes:
            parts.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        parts.append("".join(current))
    return parts


def test_texts_whose_lines_fit_split_exactly_as_before():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "é", "€", "😀", "\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x85", "\u2028"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        max_bytes = rng.randint(1, 40)
        stats = ReadStats()
        parts = split_lines(text, max_bytes, stats)
        assert "".join(parts) == text
        if all(len(line.encode()) <= max_bytes for line in text.splitlines(keepends=True)):
            assert parts == split_lines_before(text, max_bytes) and stats.long_lines_split == 0
        else:
            assert stats.long_lines_split > 0 and all(len(p.encode()) <= max(max_bytes, 4) for p in parts)
    # The standard library, cut far finer than the default: the same pieces as before.
    for path in sorted(stdlib_source.stdlib_root().glob("*.py"))[:60]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if all(len(line.encode()) <= 4000 for line in text.splitlines(keepends=True)):
            assert split_lines(text, 4000) == split_lines_before(text, 4000), path


@pytest.mark.parametrize("unit", ["word ", "x", "é€"], ids=["spaces", "no-space", "multibyte"])
def test_a_30mb_single_line_is_cut_in_bounded_memory(unit):
    text = unit * (30_000_000 // len(unit.encode()))
    size, max_bytes = len(text.encode()), 2_000_000
    stats = ReadStats()
    tracemalloc.start()
    try:
        parts = split_lines(text, max_bytes, stats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * size, f"splitting a {size / 1e6:.0f} MB line peaked at {peak / 1e6:.0f} MB"
    assert "".join(parts) == text and stats.long_lines_split == 1
    assert all(len(p.encode()) <= max_bytes for p in parts) and len(parts) <= size // max_bytes + 1
    if unit == "word ":  # cut after a space, never inside a word
        assert all(p.endswith(" ") for p in parts)


def test_an_ingested_one_line_file_is_cut_and_counted(tmp_path):
    (tmp_path / "minified.txt").write_text("token " * 400_000)  # 2.4 MB, one line
    source = LocalSource(kind="local", name="mine", paths=[str(tmp_path / "*.txt")])
    recipe, stats = IngestRecipe(max_doc_bytes=500_000), ReadStats()
    docs = [d for shard in file_sources.discover(source, recipe)
            for d in file_sources.read(shard, source, recipe, stats)]
    assert len(docs) == 5 and all(len(d.text) <= 500_000 for d in docs)
    assert stats.split_documents == 1 and stats.long_lines_split == 1
    assert docs[1].id == "mine:minified.txt#part1"
