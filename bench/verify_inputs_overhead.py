"""Verifying a step's inputs before it builds vs the step itself, on the default graph.

Materializes the default manifest's graph cold on a fresh temporary instance and store, in one
process: by default the data stage, the corpus inventory, the tokenizer, the token shards and the
pretraining of one model size (the first), which reads every token shard, the held-out tokens and
the tokenizer. Every step that builds re-hashes the input files it is about to read and records
what that took within its own wall time (`input_verify_seconds`, `input_bytes_verified` beside
`wall_seconds`), so each ratio is measured against its peer, the step's work, in the same run:
the asset body's own work (`wall_seconds`) and the whole Dagster step (start to end: loading the
input handles, the body, the events). The target: verification under 5 % of every step. The
inputs were just written, so they are read from the page cache; on a cold disk or S3 both the
verification and the step's own read slow down.
Usage: python bench/verify_inputs_overhead.py [--manifest PATH] [--select SEL] [--size SIZE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.definitions import build_definitions  # noqa: E402
from llm_assets.manifest import load_manifest  # noqa: E402
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402
from resources.handles import META_INPUT_BYTES_VERIFIED, META_INPUT_VERIFY_SECONDS  # noqa: E402

DEFAULT_SELECTION = "+key:pretrain_checkpoint or key:corpus_inventory"
TARGET = 0.05


class Step(NamedTuple):
    verify: float  # seconds verifying the inputs
    wall: float  # the asset body's wall_seconds (verification included): the in-asset work
    step: float  # the Dagster step, start to end (loading inputs, the body, storing, events)
    hashed: int  # input bytes hashed


def step_of(instance: dg.DagsterInstance, asset: str, partition: str | None) -> Step:
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(asset),
                              asset_partitions=[partition] if partition else None), limit=1).records[0]
    meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    (stats,) = instance.get_run_step_stats(record.run_id, step_keys=[asset.replace("/", "__")])
    return Step(float(meta[META_INPUT_VERIFY_SECONDS]), max(float(meta["wall_seconds"]), 1e-6),
                max(stats.end_time - stats.start_time, 1e-6), int(meta[META_INPUT_BYTES_VERIFIED]))


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
        per_asset: dict[str, list[Step]] = {}
        for outcome in drive.outcomes:
            if not outcome.cache_hit:
                per_asset.setdefault(outcome.asset, []).append(step_of(instance, outcome.asset, outcome.partition))

    rows, worst_in_asset, worst_step = [], (0.0, ""), (0.0, "")
    totals = Step(0.0, 0.0, 0.0, 0)
    for asset, steps in per_asset.items():
        verify, wall, step_s, hashed = (sum(getattr(s, f) for s in steps) for f in Step._fields)
        totals = Step(totals.verify + verify, totals.wall + wall, totals.step + step_s, totals.hashed + hashed)
        in_asset = max(s.verify / s.wall for s in steps)
        of_step = max(s.verify / s.step for s in steps)
        worst_in_asset = max(worst_in_asset, (in_asset, asset))
        worst_step = max(worst_step, (of_step, asset))
        rate = f" at {hashed / 1e6 / verify:4.0f} MB/s" if verify else ""
        rows.append((asset, f"{len(steps):>2} step(s): verify {verify * 1e3:6.1f} ms | in-asset work "
                            f"{wall:6.2f}s: {verify / wall:6.2%} (worst {in_asset:6.2%}) | Dagster step "
                            f"{step_s:6.2f}s: {verify / step_s:6.2%} (worst {of_step:6.2%}) | "
                            f"{hashed / 1e6:5.1f} MB{rate}"))
    rows += [
        ("all steps", f"verify {totals.verify:.3f}s: {totals.verify / totals.wall:.3%} of {totals.wall:.1f}s "
                      f"in-asset work, {totals.verify / totals.step:.3%} of {totals.step:.1f}s of steps; "
                      f"{totals.hashed / 1e6:.1f} MB hashed; drive wall {wall_s:.1f}s"),
        ("worst step", f"{worst_step[0]:.2%} of a Dagster step ({worst_step[1]}), {worst_in_asset[0]:.2%} of "
                       f"in-asset work ({worst_in_asset[1]}); target < {TARGET:.0%} of the step: "
                       f"{'met' if worst_step[0] < TARGET else 'NOT met'}"),
    ]
    report(f"input verification vs the step's work ({args.select}; model size {size})", rows)


if __name__ == "__main__":
    main()
