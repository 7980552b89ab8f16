"""Rematerializing an unchanged graph (all cache hits) vs its first, cold materialization.

Runs the default manifest's graph twice on a fresh temporary instance and store, in one process,
and reports the wall-time ratio. Usage: python bench/cache_rematerialize.py [--manifest PATH]
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
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default=str(PROJECT_ROOT / "pipeline.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp() as instance:
        settings = Settings(args.manifest, f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None)
        defs = build_definitions(settings)
        cold_s, cold = timed(lambda: materialize_graph(defs, instance, log=lambda _: None))
        warm_s, warm = timed(lambda: materialize_graph(defs, instance, log=lambda _: None))
    assert cold.success and warm.success
    compute_cold = sum(o.seconds for o in cold.outcomes)
    compute_warm = sum(o.seconds for o in warm.outcomes)
    report("rematerialize an unchanged graph vs cold", [
        ("materializations", f"{len(cold.outcomes)} cold, {len(warm.outcomes)} warm"),
        ("cache hits", f"{cold.cache_hits} cold, {warm.cache_hits} warm"),
        ("wall seconds", f"cold {cold_s:.2f}s, warm {warm_s:.2f}s"),
        ("wall ratio warm/cold", f"{warm_s / cold_s:.3f}"),
        ("in-asset seconds", f"cold {compute_cold:.2f}s, warm {compute_warm:.2f}s "
                             f"(ratio {compute_warm / compute_cold:.3f})"),
        ("what remains warm", "Dagster run overhead per partition + hash gates re-hashing every artifact"),
    ])


if __name__ == "__main__":
    main()
