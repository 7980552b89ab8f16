"""Rematerializing an unchanged graph (all cache hits) vs its first, cold materialization.

Runs the manifest's graph (a copy of it, so an edit during the run changes nothing; its relative
paths resolve against the copy's folder) on a fresh
temporary instance and store, in one process: cold, then warm launching every run (a cache hit
per step, as before `llm_assets.unchanged`), then warm as the driver runs it (unchanged wave
partitions launch no run). Reports the wall-time ratios.
Usage: python bench/cache_rematerialize.py [--manifest PATH] [--select SELECTION]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.definitions import build_definitions  # noqa: E402
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default=str(PROJECT_ROOT / "pipeline.yaml"))
    parser.add_argument("--select", default=None, help="an asset selection (default: the whole graph)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp() as instance:
        manifest = shutil.copy(args.manifest, f"{tmp}/pipeline.yaml")
        settings = Settings(manifest, f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None)
        defs = build_definitions(settings)

        def drive(skip: bool):
            return materialize_graph(defs, instance, args.select, log=lambda _: None, skip_unchanged=skip)

        cold_s, cold = timed(lambda: drive(True))
        runs_s, runs = timed(lambda: drive(False))
        warm_s, warm = timed(lambda: drive(True))
    assert cold.success and runs.success and warm.success
    compute_cold = sum(o.seconds for o in cold.outcomes)
    compute_warm = sum(o.seconds for o in runs.outcomes)  # the skipping drive spends none
    report("rematerialize an unchanged graph vs cold", [
        ("materializations", f"{len(cold.outcomes)} cold, {len(warm.outcomes)} warm"),
        ("cache hits", f"{cold.cache_hits} cold, {warm.cache_hits} warm"),
        ("wall seconds", f"cold {cold_s:.2f}s, warm launching every run {runs_s:.2f}s, warm {warm_s:.2f}s"),
        ("wall ratio warm/cold", f"{warm_s / cold_s:.3f} (launching every run: {runs_s / cold_s:.3f})"),
        ("in-asset seconds", f"cold {compute_cold:.2f}s, warm launching every run {compute_warm:.2f}s "
                             f"(ratio {compute_warm / compute_cold:.3f})"),
    ])
    report("in-asset seconds per asset (cold, warm launching every run)", [
        (asset, f"{built:8.2f}s {hit:8.2f}s") for asset, (built, hit) in sorted(
            _per_asset(cold.outcomes, runs.outcomes).items(), key=lambda item: -item[1][0])
    ])


def _per_asset(cold: list, warm: list) -> dict[str, tuple[float, float]]:
    """Seconds spent inside each asset's body, summed over its partitions, cold and warm."""
    totals: dict[str, list[float]] = {}
    for index, outcomes in enumerate((cold, warm)):
        for outcome in outcomes:
            totals.setdefault(outcome.asset, [0.0, 0.0])[index] += outcome.seconds
    return {asset: (c, w) for asset, (c, w) in totals.items()}


if __name__ == "__main__":
    main()
