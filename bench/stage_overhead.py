"""Each heavy stage inside its asset vs the same work called directly in this script.

Builds a pipeline on a temporary instance (with the project's instance config, as the quickstart's)
and store (a slice of the stdlib as corpus, the quickstart's tiny-1m model, briefly pretrained) and
materializes everything up to the post-training data untimed. The timed stages are the quickstart's:
its step counts, evaluation documents and quantization texts (pipeline.yaml), unless --steps and
--limit make them smaller. Then, stage by stage, it materializes the asset (a Dagster run with its
checks, reading and verifying its inputs, committing its artifact to the store) and does the same
work on the same inputs directly:
- sft_model, reward_model, policy: `run_sft` / `run_reward` / `run_policy` with the same recipe;
- eval_report: the held-out tasks written and lm-eval's `simple_evaluate` called as the asset calls
  it, then the unigram baseline and the refusal rates the report also holds.
Each trainer, and lm-eval, is first called once untimed on one step or document: a first call in a
process pays for imports and set-up that neither side should be charged with.
- quantized_model, per scheme: the quantization worker's `run` on the same spec, in one process of
  the quantization environment (gptqmodel lives there, not here). The first scheme on each side
  includes starting that interpreter: the asset starts its long-lived worker, the direct side its
  driver.
Reports seconds of the asset's drive (and of its step's body within it: verifying the inputs,
building, committing), seconds direct, and the ratio of the drive to the direct work.
Usage: python bench/stage_overhead.py [--steps N] [--limit DOCS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dagster as dg
import lm_eval
import polars as pl
import yaml
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.definitions import build_definitions  # noqa: E402
from llm_assets.evaluation.safety import BENIGN_FILE, RED_TEAM_FILE, load_prompts, refusal_rate  # noqa: E402
from llm_assets.evaluation.tasks import load_task_dirs, perplexity_texts, write_builtin_tasks  # noqa: E402
from llm_assets.evaluation.unigram import shard_log_probs, unigram_bits_per_byte  # noqa: E402
from llm_assets.hf_models import training_device  # noqa: E402
from llm_assets.manifest import PipelineManifest, PolicyRecipe, RewardRecipe, SftRecipe, load_manifest  # noqa: E402
from llm_assets.posttrain.dataset_files import read_dataset  # noqa: E402
from llm_assets.posttrain.policy import run_policy  # noqa: E402
from llm_assets.posttrain.reward import run_reward  # noqa: E402
from llm_assets.posttrain.sft import run_sft  # noqa: E402
from llm_assets.quantize.assets import pick_texts, write_texts  # noqa: E402
from llm_assets.quantize.worker import QuantizeSpec  # noqa: E402
from llm_assets.runner import materialize_graph  # noqa: E402
from llm_assets.settings import PROJECT_ROOT, Settings, prepare_dagster_home  # noqa: E402
from llm_assets.store import open_store  # noqa: E402
from llm_assets.tokenizer.assets import TOKENIZER_FILE  # noqa: E402

SIZE = "bench"
RecipeT = TypeVar("RecipeT", SftRecipe, RewardRecipe, PolicyRecipe)
SCHEMES = ("int8", "gptq-4bit")  # on both sides, the first scheme pays for the worker's lazy imports
# Run in the quantization environment: announce itself once started, then time `run` on each spec
# path it is given, as the asset's worker runs it (its lazy imports of torch, transformers,
# torchao and gptqmodel fall in the first specs' time on both sides).
QUANTIZE_DRIVER = """
import json, sys, time
from pathlib import Path
from llm_assets.quantize.worker import QuantizeSpec, run
print(json.dumps({"bench": "ready"}), flush=True)
for path in sys.argv[1:]:
    spec = QuantizeSpec.model_validate_json(Path(path).read_text())
    started = time.perf_counter()
    run(spec)
    print(json.dumps({"bench": "seconds", "value": time.perf_counter() - started}), flush=True)
"""


def small_manifest(path: Path, steps: int | None, limit: int | None) -> None:
    """The bench's pipeline.yaml: a small corpus, the quickstart's stages (or `steps` optimizer
    steps per post-training stage and `limit` documents per evaluation task)."""
    manifest = yaml.safe_load((PROJECT_ROOT / "pipeline.yaml").read_text())
    # The tests' slice of the stdlib, whose splits pass the contamination gate.
    manifest["sources"] = [{"kind": "python_stdlib", "name": "stdlib", "include": ["json/*", "email/*"],
                            "shard_mb": 0.5}]
    manifest["stages"]["splits"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    manifest["stages"]["tokenizer"]["sample_mb"] = 1.0
    manifest["stages"]["pretrain"].update({"steps": 40, "eval_every": 20, "checkpoint_every": 0})
    manifest["model_sizes"] = {SIZE: manifest["model_sizes"]["tiny-1m"]}
    if steps is not None:
        for stage in ("sft", "reward", "policy"):
            manifest["stages"][stage]["steps"] = steps
    # The checks still run and are timed, but a short run's figures may miss the gates: that must
    # not stop the drive.
    manifest["gates"] = {name: {**gate, "blocking": False} for name, gate in manifest["gates"].items()}
    manifest["stages"]["quantize"]["schemes"] = list(SCHEMES)
    if limit is not None:
        manifest["stages"]["evaluation"]["limit"] = limit
        manifest["stages"]["quantize"].update({"calibration_texts": 4 * limit, "heldout_texts": 2 * limit})
    path.write_text(yaml.safe_dump(manifest))


def handle_dir(instance: dg.DagsterInstance, store, asset: str, partition: str | None = None) -> Path:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return store.local_dir(records[0].asset_materialization.metadata["sha256"].value)


def partition_dirs(instance: dg.DagsterInstance, store, asset: str) -> list[Path]:
    """The artifact of each partition of `asset`, in partition order."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset)), limit=1000).records
    latest: dict[str, str] = {}
    for record in records:  # newest first
        mat = record.asset_materialization
        latest.setdefault(mat.partition, mat.metadata["sha256"].value)
    return [store.local_dir(latest[key]) for key in sorted(latest)]


def harness_directly(model_dir: Path, splits_dir: Path, tasks_dir: Path, manifest: PipelineManifest,
                     limit: int | None) -> None:
    """eval_report's held-out tasks written to `tasks_dir` and lm-eval's `simple_evaluate` called on
    them with the arguments the asset's harness passes."""
    recipe, seed = manifest.stages.evaluation, manifest.seed
    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    names = write_builtin_tasks(
        pl.read_parquet(splits_dir / "test.parquet"), tasks_dir, seed=seed, max_docs=recipe.max_docs,
        max_answer_chars=min(200, positions // 2), max_target_chars=min(80, positions // 4),
        max_gen_toks=min(48, positions // 4), render=None)
    os.environ["DISABLE_MULTIPROC"] = "1"  # as the asset's harness runs it
    lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "tokenizer": str(model_dir), "dtype": "float32"},
        tasks=names, batch_size=recipe.batch_size, device=training_device().type, limit=limit,
        bootstrap_iters=100, log_samples=False, task_manager=load_task_dirs([tasks_dir]),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def evaluate_directly(model_dir: Path, splits_dir: Path, token_dirs: list[Path], tokenizer_dir: Path,
                      manifest: PipelineManifest) -> dict[str, float]:
    """What eval_report does for a size pretrained here, without Dagster or the store: seconds of
    lm-eval (its tasks written first) and of the unigram baseline and refusal rates after it."""
    from tokenizers import Tokenizer

    recipe = manifest.stages.evaluation
    with tempfile.TemporaryDirectory() as tasks_dir:
        def the_rest() -> None:
            scored = perplexity_texts(Path(tasks_dir), recipe.limit)
            tokenizer = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
            unigram_bits_per_byte(scored, tokenizer, shard_log_probs(token_dirs))
            for prompts in (RED_TEAM_FILE, BENIGN_FILE):
                refusal_rate(model_dir, load_prompts(prompts), max_new_tokens=recipe.safety_max_new_tokens,
                             batch_size=recipe.batch_size)

        lm_eval_s, _ = timed(lambda: harness_directly(model_dir, splits_dir, Path(tasks_dir), manifest, recipe.limit))
        rest_s, _ = timed(the_rest)
    return {"lm-eval": lm_eval_s, "unigram, refusal rates": rest_s}


def quantize_directly(python: str, model_dir: Path, splits_dir: Path, manifest: PipelineManifest,
                      tmp: Path) -> list[float]:
    """Seconds of the worker's `run` on each scheme's spec (written as quantized_model writes it),
    the first with the start of the quantization environment's interpreter that runs them all."""
    recipe, seed = manifest.stages.quantize, manifest.seed
    max_tokens = min(recipe.max_tokens, AutoConfig.from_pretrained(model_dir).max_position_embeddings)
    heldout = write_texts(tmp / "heldout.jsonl", pick_texts([splits_dir / "test.parquet"], recipe.heldout_texts, seed))
    calibration = write_texts(tmp / "calibration.jsonl",
                              pick_texts(sorted((splits_dir / "train").glob("*.parquet")), recipe.calibration_texts,
                                         seed))
    spec_paths = []
    for scheme in SCHEMES:
        spec = QuantizeSpec(scheme=scheme, model_dir=str(model_dir), out_dir=str(tmp / scheme), max_tokens=max_tokens,
                            heldout=str(heldout), calibration=str(calibration) if scheme == "gptq-4bit" else None,
                            group_size=recipe.group_size, seed=seed, error_file=str(tmp / f"{scheme}-error.txt"))
        spec_paths.append(tmp / f"{scheme}.json")
        spec_paths[-1].write_text(spec.model_dump_json())
    launched = time.perf_counter()
    worker = subprocess.Popen([python, "-c", QUANTIZE_DRIVER, *map(str, spec_paths)], stdout=subprocess.PIPE, text=True)
    start_s, seconds = 0.0, []
    for line in worker.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library's own output
        if not isinstance(event, dict):
            continue
        if event.get("bench") == "ready":
            start_s = time.perf_counter() - launched
        elif event.get("bench") == "seconds":
            seconds.append(event["value"])
    if worker.wait() or len(seconds) != len(SCHEMES):
        sys.exit(f"the quantization driver failed (exit code {worker.returncode}); its error output is above")
    return [start_s + seconds[0], *seconds[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of each post-training stage (default: the quickstart's)")
    parser.add_argument("--limit", type=int, default=None,
                        help="documents per lm-eval task; GPTQ calibrates on 4× and quality is measured on 2× as "
                             "many (default: the quickstart's)")
    args = parser.parse_args()
    python = Settings.from_env().quantize_python
    if not Path(python).is_file():
        sys.exit(f"no quantization environment at {python}: run `make install`")
    rows: list[tuple[str, str]] = []

    def row(name: str, asset_s: float, step_s: float, direct_s: float, note: str = "") -> None:
        rows.append((name, f"asset {asset_s:6.1f}s (step body {step_s:6.1f}s)  direct {direct_s:6.1f}s  "
                           f"ratio {asset_s / direct_s:.2f}" + (f"  ({note})" if note else "")))

    with tempfile.TemporaryDirectory() as tmp, \
            dg.DagsterInstance.local_temp(str(prepare_dagster_home(Path(tmp) / "dagster_home"))) as instance:
        manifest_path = Path(tmp) / "pipeline.yaml"
        small_manifest(manifest_path, args.steps, args.limit)
        manifest = load_manifest(manifest_path)
        settings = Settings(str(manifest_path), f"{tmp}/artifacts", f"{tmp}/alerts.jsonl", None, None,
                            quantize_python=python)
        store = open_store(settings.store_uri)
        defs = build_definitions(settings)
        upstream = "+key:pretrain_checkpoint or key:sft_dataset or key:preference_dataset"
        assert materialize_graph(defs, instance, selection=upstream, log=lambda _: None).success

        def asset_seconds(asset: str, partition: str | None = None) -> tuple[float, float]:
            """Seconds of the drive that materializes `asset` (a run, its checks), and of the step's
            body within it (its `wall_seconds`: verifying inputs, building, committing)."""
            seconds, result = timed(lambda: materialize_graph(
                defs, instance, selection=f"key:{asset}", log=lambda _: None,
                partitions=[partition] if partition else None))
            assert result.success, f"{asset} failed: {result}"
            latest = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records[0]
            metadata = latest.asset_materialization.metadata
            assert not metadata["cache_hit"].value, f"{asset}: a cache hit, not a build"
            return seconds, float(metadata["wall_seconds"].value)

        sft_rows = read_dataset(handle_dir(instance, store, "sft_dataset"))
        pairs = read_dataset(handle_dir(instance, store, "preference_dataset"))
        stages, seed = manifest.stages, manifest.seed

        def steps(recipe: RecipeT, count: int) -> RecipeT:
            return recipe.model_copy(update={"steps": count})

        posttrain: list[tuple[str, RecipeT, Callable[[Path, Path, RecipeT], object]]] = [
            ("sft_model", stages.sft, lambda out, work, recipe: run_sft(
                handle_dir(instance, store, "pretrain_checkpoint", SIZE), *sft_rows, recipe, out, work, seed=seed)),
            ("reward_model", stages.reward, lambda out, work, recipe: run_reward(
                handle_dir(instance, store, "sft_model", SIZE), *pairs, recipe, out, work, seed=seed)),
            ("policy", stages.policy, lambda out, work, recipe: run_policy(
                handle_dir(instance, store, "sft_model", SIZE), handle_dir(instance, store, "reward_model", SIZE),
                *pairs, recipe, out, work, seed=seed)),
        ]
        for asset, recipe, direct in posttrain:
            # One step untimed first (see the module's docstring).
            with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as work:
                direct(Path(out), Path(work), steps(recipe, 1))
            asset_s, step_s = asset_seconds(asset)
            with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as work:
                direct_s, _ = timed(lambda: direct(Path(out), Path(work), recipe))
            row(f"{asset} ({recipe.steps} steps)", asset_s, step_s, direct_s)

        model_dir = handle_dir(instance, store, "policy", SIZE)
        splits_dir = handle_dir(instance, store, "dataset_splits")
        with tempfile.TemporaryDirectory() as warm_up:
            harness_directly(model_dir, splits_dir, Path(warm_up), manifest, limit=1)
        asset_s, step_s = asset_seconds("eval_report")
        parts = evaluate_directly(model_dir, splits_dir, partition_dirs(instance, store, "token_shards"),
                                  handle_dir(instance, store, "tokenizer"), manifest)
        evaluated = f"limit {args.limit}" if args.limit else f"max_docs {stages.evaluation.max_docs}"
        row(f"eval_report ({evaluated})", asset_s, step_s, sum(parts.values()),
            ", ".join(f"{name} {s:.1f}s" for name, s in parts.items()))

        asset_quantize = [asset_seconds("quantized_model", scheme) for scheme in SCHEMES]
        quantize_tmp = Path(tmp) / "quantize-direct"
        quantize_tmp.mkdir()
        direct_quantize = quantize_directly(python, model_dir, splits_dir, manifest, quantize_tmp)
        for scheme, (asset_s, step_s), direct_s in zip(SCHEMES, asset_quantize, direct_quantize, strict=True):
            row(f"quantized_model[{scheme}]", asset_s, step_s, direct_s,
                "both sides start the quantization interpreter" if scheme == SCHEMES[0] else "")
    report("heavy stages inside their asset vs the same work called directly", [
        *rows,
        ("what the asset adds", "a Dagster run, loading and verifying the input handles, committing the artifact "
                                "(and checkpoints) to the store, the hash, gate and contamination checks"),
    ])


if __name__ == "__main__":
    main()
