"""Shard cleaning throughput (read + clean_frame + write) vs a plain parquet read + write.

Builds raw shards from the running interpreter's standard library (every .py file outside
site-packages and test directories, one document per file, kind "code") plus a few synthetic HTML
pages, writes them as zstd parquet like raw_corpus does, then times, over the same shards:
(a) polars read_parquet + write_parquet, the peer, and (b) read + clean_frame + write. Reports
MB/s of source text for both, their ratio, the cleaning statistics, and where the cleaning time
goes, stage by stage. Usage:
python bench/cleaning_throughput.py [--shard-mb 2] [--html-docs 40] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.data.cleaning import CleanStats, clean_frame  # noqa: E402
from llm_assets.data.html_text import html_to_text  # noqa: E402
from llm_assets.data.normalize import normalize_text  # noqa: E402
from llm_assets.data.pii import redact_pii  # noqa: E402
from llm_assets.data.quality import quality_failures, quality_signals  # noqa: E402
from llm_assets.manifest import CleanRecipe  # noqa: E402

SCHEMA = {name: pl.String for name in ("id", "text", "source", "uri", "kind", "sha256")}
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_documents() -> list[tuple[str, str, str]]:
    """(id, kind, text) for every stdlib .py file outside site-packages and test directories."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                text = path.read_bytes().decode("utf-8", errors="replace")
                docs.append((path.relative_to(root).as_posix(), "code", text))
    return docs


def html_documents(count: int) -> list[tuple[str, str, str]]:
    """Synthetic pages: boilerplate, scripts and styles around a few paragraphs holding PII."""
    docs = []
    for i in range(count):
        paragraphs = "".join(
            f"<p>Paragraph {j} of page {i} explains how the widget &amp; its parts fit together, "
            f"and why the <b>assembly</b> order matters for the final result.</p>"
            for j in range(12)
        )
        page = (
            f"<!DOCTYPE html><html><head><title>Page {i}</title><style>p {{ margin: 0 }}</style>"
            f"<script>window.analytics = {{id: {i}}};</script></head><body>"
            f"<nav><a href='/'>Home</a><a href='/docs'>Docs</a></nav><header>Widgets Inc.</header>"
            f"<article><h1>Widget guide {i}</h1>{paragraphs}"
            f"<p>Questions? Mail support{i}@widgets.example.com or call +1 (555) 010-{i % 10000:04d}.</p>"
            f"<ul><li>Fast</li><li>Cheap</li><li>Good</li></ul></article>"
            f"<footer>&copy; Widgets Inc. &middot; 1 Main St</footer></body></html>"
        )
        docs.append((f"page-{i:04d}.html", "html", page))
    return docs


def shard_frames(docs: list[tuple[str, str, str]], shard_mb: float) -> list[pl.DataFrame]:
    """Documents cut, in order, into frames of about ``shard_mb`` of text each."""
    shards, rows, size = [], [], 0
    for doc_id, kind, text in docs:
        rows.append((doc_id, text, "stdlib", f"bench://{doc_id}", kind, hashlib.sha256(text.encode()).hexdigest()))
        size += len(text.encode())
        if size >= shard_mb * 1e6:
            shards.append(pl.DataFrame(rows, schema=SCHEMA, orient="row"))
            rows, size = [], 0
    if rows:
        shards.append(pl.DataFrame(rows, schema=SCHEMA, orient="row"))
    return shards


def merge(total: CleanStats, shard: CleanStats) -> None:
    for name in ("documents_in", "documents_out", "html_converted", "replacement_chars", "chars_in", "chars_out"):
        setattr(total, name, getattr(total, name) + getattr(shard, name))
    for counts, more in ((total.pii_redacted, shard.pii_redacted), (total.dropped_by_reason, shard.dropped_by_reason)):
        for key, n in more.items():
            counts[key] = counts.get(key, 0) + n


def best_of(repeat: int, fn) -> tuple[float, object]:
    runs = [timed(fn) for _ in range(repeat)]
    return min(runs, key=lambda run: run[0])


def stage_breakdown(docs: list[tuple[str, str, str]], recipe: CleanRecipe) -> list[tuple[str, float, float]]:
    """(stage, seconds, millions of characters in) for each step of the per-document work."""
    seconds = dict.fromkeys(["html_to_text", "normalize_text", "redact_pii", "quality", "sha256"], 0.0)
    chars = dict.fromkeys(seconds, 0)

    def clock(stage, fn, text, *args):
        started = time.perf_counter()
        result = fn(text, *args)
        seconds[stage] += time.perf_counter() - started
        chars[stage] += len(text)
        return result

    for _, kind, text in docs:
        if kind == "html":
            text = clock("html_to_text", html_to_text, text)
        text = clock("normalize_text", normalize_text, text, recipe.unicode_form)
        text, _ = clock("redact_pii", redact_pii, text, recipe.redact)
        clock("quality", lambda t: quality_failures(quality_signals(t), recipe), text)
        clock("sha256", lambda t: hashlib.sha256(t.encode()).hexdigest(), text)
    return [(stage, seconds[stage], chars[stage] / 1e6) for stage in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-mb", type=float, default=2.0)
    parser.add_argument("--html-docs", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3, help="Best of this many runs of each")
    parser.add_argument("--profile", action="store_true", help="Also print cProfile's top functions")
    args = parser.parse_args()
    recipe = CleanRecipe()
    docs = stdlib_documents() + html_documents(args.html_docs)
    total_mb = sum(len(text.encode()) for _, _, text in docs) / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        raw_dir, peer_dir, clean_dir = (Path(tmp) / name for name in ("raw", "peer", "clean"))
        for d in (raw_dir, peer_dir, clean_dir):
            d.mkdir()
        for i, frame in enumerate(shard_frames(docs, args.shard_mb)):
            frame.write_parquet(raw_dir / f"shard-{i:04d}.parquet", compression="zstd", statistics=True)
        paths = sorted(raw_dir.iterdir())

        def copy_shards() -> None:
            for path in paths:
                pl.read_parquet(path).write_parquet(peer_dir / path.name, compression="zstd")

        def clean_shards() -> CleanStats:
            total = CleanStats()
            for path in paths:
                cleaned, stats = clean_frame(pl.read_parquet(path), recipe)
                cleaned.write_parquet(clean_dir / path.name, compression="zstd")
                merge(total, stats)
            return total

        peer_s, _ = best_of(args.repeat, copy_shards)
        clean_s, stats = best_of(args.repeat, clean_shards)

        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(clean_shards)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())

    report(f"shard cleaning vs parquet read+write ({total_mb:.1f} MB of text, {len(docs)} docs, {len(paths)} shards)", [
        ("peer: read + write", f"{total_mb / peer_s:8.1f} MB/s ({peer_s:.2f}s)"),
        ("read + clean_frame + write", f"{total_mb / clean_s:8.1f} MB/s ({clean_s:.2f}s)"),
        ("overhead ratio clean/peer", f"{clean_s / peer_s:.1f}x"),
    ])
    dropped = {reason: n for reason, n in stats.dropped_by_reason.items() if n}
    report("cleaning statistics", [
        ("documents", f"{stats.documents_in} in, {stats.documents_out} out (kept {stats.kept_fraction:.3f})"),
        ("dropped by first failing rule", str(dropped)),
        ("PII redacted by kind", str(stats.pii_redacted)),
        ("HTML pages converted", str(stats.html_converted)),
        ("U+FFFD kept in output", str(stats.replacement_chars)),
        ("chars", f"{stats.chars_in:,} in, {stats.chars_out:,} out"),
    ])
    stages = stage_breakdown(docs, recipe)
    spent = sum(s for _, s, _ in stages)
    report("where the per-document time goes", [
        (stage, f"{s:6.2f}s {100 * s / spent:5.1f}%  {mchars / s:7.1f} M chars/s of its input")
        for stage, s, mchars in stages
    ])

if __name__ == "__main__":
    main()
