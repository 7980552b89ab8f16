"""Verifying a step's inputs before it builds vs the step itself, on the default graph.

Materializes the default manifest's graph cold on a fresh temporary instance and store, in one
process: by default the data stage, the corpus inventory, the tokenizer, the token shards and the
pretraining of one model size (the first), which reads every token shard, the held-out tokens and
the tokenizer. Every step that builds re-hashes the input files it is about to read and records
what that took within its own wall time (`input_verify_seconds`, `input_bytes_verified` beside
`wall_seconds`), so each ratio is measured against its peer, the step's work, in the same run.
The target: verification under 5 % of every step. The inputs were just written, so they are read
from the page cache; on a cold disk or S3 both the verification and the step's own read slow down.
Usage: python bench/verify_inputs_overhead.py [--manifest PATH] [--select SEL] [--size SIZE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.definitions import build_definitions  # noqa: E402
from llm_assets.manifest import load_manifest  # noqa: E402
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402
from resources.handles import (  # noqa: E402
    META_INPUT_BYTES_VERIFIED,
    META_INPUT_VERIFY_SECONDS,
    latest_materializations,
)

DEFAULT_SELECTION = "+key:pretrain_checkpoint or key:corpus_inventory"
TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(PROJECT_ROOT / "pipeline.yaml"))
    parser.add_argument("--select", default=DEFAULT_SELECTION, help=f"asset selection (default: {DEFAULT_SELECTION})")
    parser.add_argument("--size", help="the model size to train (default: the manifest's first)")
    args = parser.parse_args()
    size = args.size or next(iter(load_manifest(args.manifest).model_sizes), None)
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp() as instance:
        settings = Settings(args.manifest, f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None)
        defs = build_definitions(settings)
        wall_s, drive = timed(lambda: materialize_graph(defs, instance, selection=args.select, log=lambda _: None,
                                                        partitions=[size] if size else None))
        assert drive.success, f"the drive failed: runs {drive.failed_runs}"
        per_asset: dict[str, list[tuple[float, float, int]]] = {}
        for outcome in drive.outcomes:
            if outcome.cache_hit:
                continue
            mat = latest_materializations(instance, dg.AssetKey.from_user_string(outcome.asset),
                                          [outcome.partition] if outcome.partition else None)[outcome.partition]
            meta = {k: v.value for k, v in mat.metadata.items()}
            per_asset.setdefault(outcome.asset, []).append(
                (float(meta[META_INPUT_VERIFY_SECONDS]), float(meta["wall_seconds"]),
                 int(meta[META_INPUT_BYTES_VERIFIED])))

    rows, worst = [], (0.0, "")
    total_verify = total_wall = total_bytes = 0
    for asset, steps in per_asset.items():
        verify, wall, hashed = (sum(s[i] for s in steps) for i in range(3))
        wall = wall or 1e-9
        total_verify, total_wall, total_bytes = total_verify + verify, total_wall + wall, total_bytes + hashed
        step_worst = max(s[0] / s[1] if s[1] else 0.0 for s in steps)
        if step_worst > worst[0]:
            worst = (step_worst, asset)
        rate = f" at {hashed / 1e6 / verify:.0f} MB/s" if verify else ""
        rows.append((asset, f"{len(steps):>3} step(s): verify {verify:7.3f}s of {wall:8.2f}s = "
                            f"{verify / wall:7.3%} (worst step {step_worst:.3%}), "
                            f"{hashed / 1e6:7.1f} MB hashed{rate}"))
    rows += [
        ("all steps", f"verify {total_verify:.2f}s of {total_wall:.2f}s in-step = "
                      f"{total_verify / (total_wall or 1e-9):.3%}, {total_bytes / 1e6:.1f} MB hashed; "
                      f"drive wall {wall_s:.1f}s"),
        ("worst step", f"{worst[0]:.3%} ({worst[1]}); target < {TARGET:.0%}: "
                       f"{'met' if worst[0] < TARGET else 'NOT met'}"),
    ]
    report(f"input verification vs the step's work ({args.select}; model size {size})", rows)


if __name__ == "__main__":
    main()
