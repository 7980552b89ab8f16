"""Artifact store write+verify throughput vs a plain file copy of the same bytes.

Writes a directory of random files (default 256 MB in 16 files) into a fresh local store and
verifies it (hash on write, fsync, atomic commit, re-hash on verify), and compares with
shutil.copytree of the same directory. Usage: python bench/store_throughput.py [--mb 256] [--files 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.store import open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        per_file = args.mb * 1_000_000 // args.files
        for i in range(args.files):
            (src / f"part-{i:03d}.bin").write_bytes(os.urandom(per_file))
        total_mb = per_file * args.files / 1e6

        copy_s, _ = timed(lambda: shutil.copytree(src, Path(tmp) / "copy"))
        fsync_s, _ = timed(lambda: _fsync_tree(Path(tmp) / "copy"))
        store = open_store(str(Path(tmp) / "store"))
        write_s, ref = timed(lambda: store.put_dir(src))
        verify_s, verdict = timed(lambda: store.verify(ref.sha256))
        assert verdict.ok
        # What assets do: build inside the store's staging area, then commit by moving.
        with store.staging_dir() as build:
            for path in src.iterdir():
                shutil.copyfile(path, build / path.name)
            (build / "salt").write_bytes(b"new object")
            move_s, _ = timed(lambda: store.put_dir(build, move=True))
    report(f"store write+verify vs plain copy ({total_mb:.0f} MB in {args.files} files)", [
        ("plain copy", f"{total_mb / copy_s:8.1f} MB/s"),
        ("plain copy + fsync", f"{total_mb / (copy_s + fsync_s):8.1f} MB/s"),
        ("store write", f"{total_mb / write_s:8.1f} MB/s (hash + copy + fsync + atomic rename)"),
        ("store verify", f"{total_mb / verify_s:8.1f} MB/s (re-hash)"),
        ("store write+verify", f"{total_mb / (write_s + verify_s):8.1f} MB/s"),
        ("ratio (write+verify)/copy time", f"{(write_s + verify_s) / copy_s:.2f}x"),
        ("ratio (write+verify)/(copy+fsync)", f"{(write_s + verify_s) / (copy_s + fsync_s):.2f}x"),
        ("store commit by move (assets)", f"{total_mb / move_s:8.1f} MB/s (hash + fsync + rename, no copy)"),
    ])


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


if __name__ == "__main__":
    main()
