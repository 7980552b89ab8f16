"""Rolling back from the SFT stage vs a full cold run of the graph.

On a fresh temporary instance and store, in one process: a cold run of the whole graph (the
default manifest unless --manifest), then the SFT recipe is changed and the graph rolled back
from `sft_model` (the selection `key:sft_model+`: SFT and everything after it retrain, the rest
is reused), then the recipe is put back and rolled back again (every step a cache hit: the first
release is restored). Reports wall-time ratios against the cold run and the count of recomputed
vs reused asset partitions. Usage: python bench/rollback_from_sft.py [--manifest PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import dagster as dg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.definitions import build_definitions  # noqa: E402
from llm_assets.release_pointer import current_release  # noqa: E402
from llm_assets.runner import DriveResult, materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402
from llm_assets.store import open_store  # noqa: E402
from resources.handles import latest_materializations  # noqa: E402

ROLLBACK = 'key:"sft_model"+'


def _counts(result: DriveResult, total: int) -> str:
    recomputed = sum(not o.cache_hit for o in result.outcomes)
    return (f"{recomputed} recomputed, {result.cache_hits} cache hits, "
            f"{total - len(result.outcomes)} reused without running (upstream)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default=str(PROJECT_ROOT / "pipeline.yaml"))
    args = parser.parse_args()
    original = yaml.safe_load(Path(args.manifest).read_text())
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp() as instance:
        manifest_path = Path(tmp) / "pipeline.yaml"
        manifest_path.write_text(yaml.safe_dump(original))
        settings = Settings(str(manifest_path), f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None)

        def drive(selection: str | None = None) -> DriveResult:
            result = materialize_graph(build_definitions(settings), instance, selection=selection, log=lambda _: None)
            assert result.success, result.failed_runs
            return result

        cold_s, cold = timed(drive)
        graph = build_definitions(settings).resolve_asset_graph()
        total = sum(len(latest_materializations(instance, key)) for key in graph.materializable_asset_keys)
        store = open_store(settings.store_uri)
        sizes = sorted(original["model_sizes"])
        first = {size: current_release(store, size) for size in sizes}

        changed = yaml.safe_load(yaml.safe_dump(original))
        changed["stages"]["sft"]["learning_rate"] *= 0.5
        manifest_path.write_text(yaml.safe_dump(changed))
        retrain_s, retrain = timed(lambda: drive(ROLLBACK))

        manifest_path.write_text(yaml.safe_dump(original))
        restore_s, restore = timed(lambda: drive(ROLLBACK))
        restored = all(current_release(store, size) == first[size] for size in sizes)

    report("rollback from the SFT stage vs a full cold run", [
        ("asset partitions in the graph", str(total)),
        ("cold run", f"{cold_s:.1f}s: {_counts(cold, total)}"),
        ("rollback, new SFT recipe", f"{retrain_s:.1f}s: {_counts(retrain, total)}"),
        ("wall ratio retrain/cold", f"{retrain_s / cold_s:.3f}"),
        ("rollback to the first recipe", f"{restore_s:.1f}s: {_counts(restore, total)}"),
        ("wall ratio restore/cold", f"{restore_s / cold_s:.3f}"),
        ("first release current again", str(restored)),
    ])


if __name__ == "__main__":
    main()
