"""Each trl stage inside its asset vs the same trainer called directly in this script.

Builds a small pipeline (a slice of the stdlib, a tiny tokenizer and model) on a temporary
instance and store, materializes everything up to the post-training data untimed, then for SFT,
the reward model and the policy: materializes the asset (a Dagster run with its checks, store
commits of checkpoints and of the model) and calls `run_sft` / `run_reward` / `run_policy` on the
same inputs and recipe. Reports steps/s both ways and their ratio.
Usage: python bench/posttrain_overhead.py [--steps N]
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
from llm_assets.manifest import load_manifest  # noqa: E402
from llm_assets.posttrain.dataset_files import read_dataset  # noqa: E402
from llm_assets.posttrain.policy import run_policy  # noqa: E402
from llm_assets.posttrain.reward import run_reward  # noqa: E402
from llm_assets.posttrain.sft import run_sft  # noqa: E402
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings  # noqa: E402
from llm_assets.store import open_store  # noqa: E402

SIZE = "bench"


def small_manifest(path: Path, steps: int) -> None:
    manifest = yaml.safe_load((PROJECT_ROOT / "pipeline.yaml").read_text())
    # The tests' slice of the stdlib, whose splits pass the contamination gate.
    manifest["sources"] = [{"kind": "python_stdlib", "name": "stdlib", "include": ["json/*", "email/*"],
                            "shard_mb": 0.5}]
    manifest["stages"]["splits"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    manifest["stages"]["tokenizer"] = {"vocab_size": 1024, "sample_mb": 1.0}
    manifest["stages"]["pretrain"].update({"steps": 40, "eval_every": 20, "checkpoint_every": 0})
    manifest["model_sizes"] = {SIZE: {**manifest["model_sizes"]["tiny-1m"], "vocab_size": 1024}}
    for stage in ("sft", "reward", "policy"):
        manifest["stages"][stage]["steps"] = steps
    path.write_text(yaml.safe_dump(manifest))


def handle_dir(instance: dg.DagsterInstance, store, asset: str, partition: str | None = None) -> Path:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return store.local_dir(records[0].asset_materialization.metadata["sha256"].value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp() as instance:
        manifest_path = Path(tmp) / "pipeline.yaml"
        small_manifest(manifest_path, args.steps)
        manifest = load_manifest(manifest_path)
        settings = Settings(str(manifest_path), f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None)
        store = open_store(settings.store_uri)
        defs = build_definitions(settings)
        upstream = "+key:pretrain_checkpoint or key:sft_dataset or key:preference_dataset"
        assert materialize_graph(defs, instance, selection=upstream, log=lambda _: None).success

        sft_rows = read_dataset(handle_dir(instance, store, "sft_dataset"))
        pairs = read_dataset(handle_dir(instance, store, "preference_dataset"))
        stages = manifest.stages
        rows = []
        for asset, direct in (
            ("sft_model", lambda out, work: run_sft(
                handle_dir(instance, store, "pretrain_checkpoint", SIZE), *sft_rows, stages.sft, out, work,
                seed=manifest.seed)),
            ("reward_model", lambda out, work: run_reward(
                handle_dir(instance, store, "sft_model", SIZE), *pairs, stages.reward, out, work, seed=manifest.seed)),
            ("policy", lambda out, work: run_policy(
                handle_dir(instance, store, "sft_model", SIZE), handle_dir(instance, store, "reward_model", SIZE),
                *pairs, stages.policy, out, work, seed=manifest.seed)),
        ):
            asset_s, result = timed(lambda: materialize_graph(defs, instance, selection=f"key:{asset}",
                                                              log=lambda _: None))
            assert result.success, asset
            with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as work:
                direct_s, _ = timed(lambda: direct(Path(out), Path(work)))
            rows.append((f"{asset} ({args.steps} steps)",
                         f"asset {args.steps / asset_s:.2f} steps/s ({asset_s:.1f}s), direct "
                         f"{args.steps / direct_s:.2f} steps/s ({direct_s:.1f}s): asset/direct time "
                         f"{asset_s / direct_s:.2f}"))
    report("trl stages inside their asset vs called directly", [
        *rows,
        ("what the asset adds", "a Dagster run, loading the handles, committing checkpoints and the model to the "
                                "store, the hash and gate checks"),
    ])


if __name__ == "__main__":
    main()
