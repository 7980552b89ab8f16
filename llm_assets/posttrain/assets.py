"""Post-training assets: sft_dataset, preference_dataset, and per model size sft_model,
reward_model and policy, each trained with trl and saved in the Hugging Face layout.

Built from the manifest like the pretraining sweep (the model stages are partitioned by its
`model_sizes`). Every trainer commits its `checkpoint-N` directories to the store under the
step's fingerprint, so a crashed step resumes where its last checkpoint left it. Each model
stage has a blocking gate whose threshold comes from the manifest's `gates`.
"""


import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, fingerprint_of, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.compute import k8s_op_tags
from llm_assets.data.dataset_splits import file_digest, read_eval_set
from llm_assets.launch import run_worker, torchrun_command
from llm_assets.manifest import STAGE_GATES, PipelineManifest
from llm_assets.plots import loss_curve_markdown
from llm_assets.posttrain.dataset_files import write_dataset
from llm_assets.posttrain.dataset_schema import DataSetError
from llm_assets.posttrain.datasets import build_preference_dataset, build_sft_dataset
from llm_assets.posttrain.stage import ADAPTER_DIR, LOSS_CURVE, RECIPES, StageWork, run_stage, training_figures
from llm_assets.progress import ResumeError, StepProgress
from llm_assets.store import ArtifactStore
from llm_assets.tracking import STEP_METRICS
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

if TYPE_CHECKING:
    from llm_assets.posttrain.common import OnCheckpoint, OnLog, TrainingRun

# The trainers (torch, transformers, trl, peft) are imported inside the steps that run them: the
# definitions load without them.

SFT_VAL_LOSS_GATE, _ = STAGE_GATES["sft"]
REWARD_ACCURACY_GATE, _ = STAGE_GATES["reward"]
POLICY_KL_GATE, _ = STAGE_GATES["policy"]

# (train, val, test) frames of the dataset_splits artifact; see data/dataset_splits.py.
_SPLIT_COLUMNS = ["id", "text", "source", "kind"]


def _split_frames(
    store: ArtifactStore, splits: ArtifactHandle
) -> tuple[list[pl.DataFrame], pl.DataFrame, pl.DataFrame]:
    root = store.local_dir(splits.sha256)
    train = [pl.read_parquet(p, columns=_SPLIT_COLUMNS) for p in sorted((root / "train").glob("*.parquet"))]
    return train, pl.read_parquet(root / "val.parquet", columns=_SPLIT_COLUMNS), pl.read_parquet(
        root / "test.parquet", columns=_SPLIT_COLUMNS)


def decontamination_texts(manifest: PipelineManifest, test: pl.DataFrame) -> dict[str, list[str]]:
    """What post-training data must not overlap: the held-out test split (the evaluations read it)
    and every eval set the manifest names."""
    texts = {"test": test["text"].to_list()}
    for spec in manifest.stages.contamination.eval_sets:
        texts[spec.name] = read_eval_set(spec)[1]
    return texts


def _data_config(manifest: PipelineManifest, files: list[str]) -> dict[str, Any]:
    recipe = manifest.stages.posttrain_data
    return {
        "recipe": recipe,
        "seed": manifest.seed,
        "file_digests": {path: file_digest(path) for path in files},
        "eval_set_digests": {s.name: file_digest(s.path) for s in manifest.stages.contamination.eval_sets},
    }


def _data_asset(name: str, description: str, files_of: Callable[[PipelineManifest], list[str]],
                build: Callable[..., Any]) -> dg.AssetsDefinition:
    """sft_dataset and preference_dataset: the same steps around a different builder."""

    @artifact_asset(name=name, code_version="1", kinds={"polars", "json"}, group_name="posttrain",
                    description=description)
    def data_asset(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                   artifact_store: ArtifactStoreResource, dataset_splits: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, manifest = artifact_store.get_store(), pipeline.load()
        files = files_of(manifest)

        def write(out: Path) -> dict:
            train, val, test = _split_frames(store, dataset_splits)
            try:
                data = build(train, val, [Path(f) for f in files], manifest, decontamination_texts(manifest, test))
            except DataSetError as exc:
                raise dg.Failure(str(exc)) from None
            meta = write_dataset(data, out)
            stats = data.stats
            return {
                **{k: v for k, v in meta.items() if k != "preview_markdown"},
                "preview": dg.MetadataValue.md(meta["preview_markdown"]),
                "dropped_eval_overlap": stats.get("dropped_overlap_total", 0),
                "stats": dg.MetadataValue.json(stats),
            }

        return materialize_artifact(context, store, kind=name, config=_data_config(manifest, files),
                                    inputs={"dataset_splits": dataset_splits}, build=write)

    return data_asset


sft_dataset = _data_asset(
    "sft_dataset",
    "Prompt/completion pairs for SFT: the manifest's JSONL files and questions about documented "
    "corpus objects answered by their docstrings; decontaminated against every eval set.",
    lambda m: [f.path for f in m.stages.posttrain_data.sft_files],
    lambda train, val, files, m, evals: build_sft_dataset(train, val, files, m.stages.posttrain_data, evals),
)
preference_dataset = _data_asset(
    "preference_dataset",
    "Prompt/chosen/rejected triples for the reward model and DPO: the manifest's JSONL files and "
    "corpus questions whose rejected answer is another object's docstring; decontaminated.",
    lambda m: [f.path for f in m.stages.posttrain_data.preference_files],
    lambda train, val, files, m, evals: build_preference_dataset(
        train, val, files, m.stages.posttrain_data, evals, seed=m.seed),
)


def train_step(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    *,
    config: dict[str, Any],
    inputs: dict[str, ArtifactHandle],
    narrowed_inputs: dict[str, ArtifactHandle] | None = None,
    input_files: dict[str, tuple[str, ...]] | None = None,
    train: Callable[[Path, Path, Path | None, "OnCheckpoint", "OnLog"], dict[str, Any]],
) -> dg.Output[ArtifactHandle]:
    """A trl stage as an artifact: resume from the step's committed checkpoint, commit new ones,
    log progress, and store the exported model. `train(out, work_dir, resume_from, on_checkpoint,
    on_log)` trains and returns the stage's metadata."""
    from llm_assets.posttrain.common import log_line

    label = f"{context.asset_key.to_user_string()}[{context.partition_key}]"
    progress = StepProgress(store, context.asset_key.to_user_string(), context.partition_key,
                            fingerprint_of(context, config, inputs))

    def on_checkpoint(path: Path, step: int) -> None:
        ref = progress.commit(path, step)
        context.log.info(f"{label}: checkpoint of step {step} committed as {ref.sha256[:12]}")

    def on_log(entry: dict) -> None:
        context.log.info(f"{label}: {log_line(entry)}")

    def build(out: Path) -> dict:
        try:
            found = progress.resume_point()
        except ResumeError as exc:
            raise dg.Failure(f"{label}: {exc}") from None
        if found is not None:
            context.log.info(f"{label}: resuming from the committed checkpoint of step {found[1]}")
        with tempfile.TemporaryDirectory(prefix="llm-assets-trl-") as work_dir:
            return train(out, Path(work_dir), found[0] if found else None, on_checkpoint, on_log)

    return materialize_artifact(context, store, kind="hf_model", config=config, inputs=inputs,
                                narrowed_inputs=narrowed_inputs, input_files=input_files, build=build)


def figures_metadata(figures: dict[str, Any], title: str) -> dict[str, Any]:
    """A trl stage's figures (`stage.run_stage`) as its metadata: the loss curve as an inline plot
    titled `title`, the step metrics as the tracker's curves."""
    return {**figures, LOSS_CURVE: dg.MetadataValue.md(loss_curve_markdown(figures[LOSS_CURVE], [], title)),
            STEP_METRICS: dg.MetadataValue.json(figures[STEP_METRICS])}


def training_metadata(run: "TrainingRun", title: str) -> dict[str, Any]:
    """What every trl stage shows: steps, losses, throughput and the loss curve."""
    return figures_metadata(training_figures(run), title)


# The trl worker's entry point (`llm_assets/posttrain/__main__.py`).
WORKER_MODULE = "llm_assets.posttrain"


def run_in_processes(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient,
                     artifact_store: ArtifactStoreResource, work: StageWork, out: Path, work_dir: Path,
                     resume_from: Path | None, *, processes: int, fingerprint: str) -> dict[str, Any]:
    """`stage.run_stage` in `processes` torchrun ranks, launched through Dagster Pipes: rank 0 logs
    into the run, commits each checkpoint to the store under `fingerprint` (the step's, so that a
    rerun resumes from it) and reports the stage's figures, which this returns."""
    from llm_assets.posttrain.common import per_process_batch
    from llm_assets.posttrain.job import TrlRunSpec
    from llm_assets.pretrain.job import StoreProgress

    label = context.asset_key.to_user_string() + (f"[{context.partition_key}]" if context.has_partition_key else "")
    try:  # refused here, before any process starts
        per_process_batch(RECIPES[work.stage].model_validate(work.recipe), processes)
    except ValueError as exc:
        raise dg.Failure(f"{label}: {exc}") from None
    store_config, secrets = artifact_store.for_child_process()
    with tempfile.TemporaryDirectory(prefix="llm-assets-trl-worker-") as scratch:
        spec = TrlRunSpec(
            work=work, label=label, out_dir=str(out), work_dir=str(work_dir),
            resume_from=str(resume_from) if resume_from is not None else None,
            progress=StoreProgress(store=store_config, asset=context.asset_key.to_user_string(),
                                   partition=context.partition_key if context.has_partition_key else None,
                                   fingerprint=fingerprint),
            error_file=str(Path(scratch) / "error.txt"),
        )
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        context.log.info(f"{label}: training in {processes} processes")
        return run_worker(context, client, torchrun_command(WORKER_MODULE, spec_path, processes), env=secrets,
                          error_file=Path(spec.error_file), what=f"training {label} in {processes} processes")


def trl_step(context: dg.AssetExecutionContext, artifact_store: ArtifactStoreResource,
             client: dg.PipesSubprocessClient, processes: int, work_of: Callable[[], StageWork], *,
             config: dict[str, Any], inputs: dict[str, ArtifactHandle],
             narrowed_inputs: dict[str, ArtifactHandle] | None = None,
             input_files: dict[str, tuple[str, ...]] | None = None,
             finish: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None) -> dg.Output[ArtifactHandle]:
    """sft_model, reward_model, policy: the stage's work as a `train_step`, in the step's own process
    or, when compute.training asks for several, in that many torchrun ranks (`run_in_processes`).
    `work_of()` describes the work (it reads the inputs' local copies: only on a cache miss);
    `finish(figures, out)` adds what the asset itself records besides the stage's figures."""
    store = artifact_store.get_store()

    def train(out: Path, work_dir: Path, resume: Path | None, on_checkpoint: "OnCheckpoint", on_log: "OnLog") -> dict:
        work = work_of()
        if processes == 1:
            figures = run_stage(work, out, work_dir, resume, on_checkpoint, on_log)
        else:
            figures = run_in_processes(context, client, artifact_store, work, out, work_dir, resume,
                                       processes=processes, fingerprint=fingerprint_of(context, config, inputs))
        recorded = finish(figures, out) if finish else {}  # first: it takes the figures it records otherwise
        return {**figures_metadata(figures, work.title), **recorded}

    return train_step(context, store, config=config, inputs=inputs, narrowed_inputs=narrowed_inputs,
                      input_files=input_files, train=train)


def metric_reader(gate: str, metric: str,
                  baselines: dict[str, str] | None = None) -> Callable[[dg.AssetMaterialization], Figures]:
    """What the check of one metric of a model stage reads: the metric for gates.`gate`, and the
    metadata entries `baselines` names (kind → key) as the figures it may be measured from."""

    def read(mat: dg.AssetMaterialization) -> Figures:
        values = {k: v.value for k, v in mat.metadata.items() if isinstance(v.value, (int, float))}
        measured = {kind: float(values[key]) for kind, key in (baselines or {}).items() if key in values}
        return Figures(values={gate: float(values.get(metric, float("nan")))},
                       baselines={gate: measured},
                       metadata={metric: values.get(metric, float("nan")),
                                 **{key: values[key] for key in (baselines or {}).values() if key in values}},
                       summary=f"{metric} {values.get(metric)} within gates.{gate}")

    return read


def _metric_gate(asset: dg.AssetsDefinition, gate: str, metric: str, description: str,
                 baselines: dict[str, str] | None = None) -> dg.AssetChecksDefinition:
    """The check of one metric of a model stage against gates.`gate` (see `metric_reader`)."""
    return gate_check(asset, name=f"{gate}_gate", gates=[gate], read=metric_reader(gate, metric, baselines),
                      description=description)


def _starting_model_ins(manifest: PipelineManifest) -> dict[str, dg.AssetIn]:
    """Where SFT starts: a pretrained size from its pretrain_checkpoint, a base-model size from its
    base_model. Dagster has no per-partition choice of parent, so each parent is mapped to the
    sizes it holds (a static partition mapping): a size reads its one partition of its own parent
    and nothing of the other. Without base-model sizes the dependency is pretrain_checkpoint's as
    it always was."""
    # A base-model size with continued pretraining starts from its pretrain_checkpoint too.
    if set(manifest.checkpoint_sizes) == set(manifest.model_sizes):
        return {"pretrain_checkpoint": dg.AssetIn()}
    raw_base = {name: size for name, size in manifest.base_model_sizes.items() if name not in manifest.continued_sizes}
    parents = {"pretrain_checkpoint": manifest.checkpoint_sizes, "base_model": raw_base}
    return {parent: dg.AssetIn(partition_mapping=dg.StaticPartitionMapping({size: size for size in sizes}))
            for parent, sizes in parents.items() if sizes}


def _starting_model(size: str, loaded: dict[str, ArtifactHandle | dict[str, ArtifactHandle]],
                    ) -> tuple[str, ArtifactHandle]:
    """The parent asset a size starts from and its handle, among the loaded `_starting_model_ins`
    (each a handle, or the partitions it mapped: the size's, or none)."""
    found = [(parent, value if isinstance(value, ArtifactHandle) else value[size])
             for parent, value in loaded.items() if isinstance(value, ArtifactHandle) or size in value]
    if len(found) != 1:
        raise dg.Failure(f"sft_model[{size}]: expected one starting model, got {[p for p, _ in found] or 'none'}; "
                         "reload the code location (the manifest's model_sizes changed)")
    return found[0]


def _processes(manifest: PipelineManifest) -> int:
    """The training processes a trl step runs in on this machine (compute.training)."""
    import torch

    return manifest.compute.training.processes(torch.cuda.device_count())


def _cai_dataset(model_sizes: dg.PartitionsDefinition, op_tags: dict[str, Any]) -> dg.AssetsDefinition:
    @artifact_asset(partitions_def=model_sizes, code_version="1", kinds={"huggingface", "json"},
                    group_name="posttrain", op_tags=op_tags,
                    description="Constitutional AI: the SFT model answers each constitution prompt, critiques its "
                                "answer against a sampled principle and revises it; SFT rows and (revision ≻ "
                                "answer) pairs.")
    def cai_dataset(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                    artifact_store: ArtifactStoreResource, sft_model: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        from llm_assets.posttrain.cai import ConstitutionError, constitution_prompts, run_cai, write_cai_dataset

        store, current = artifact_store.get_store(), pipeline.load()
        recipe = current.stages.constitution
        try:
            prompts = constitution_prompts(recipe, seed=current.seed)
        except ConstitutionError as exc:
            raise dg.Failure(str(exc)) from None

        def build(out: Path) -> dict:
            examples = run_cai(store.local_dir(sft_model.sha256), prompts, recipe, seed=current.seed)
            return {**write_cai_dataset(examples, out),
                    "examples": dg.MetadataValue.json([vars(e) for e in examples[:3]])}

        config = {"recipe": recipe, "seed": current.seed, "prompts": prompts}
        return materialize_artifact(context, store, kind="cai_dataset", config=config,
                                    inputs={"sft_model": sft_model}, build=build)

    return cai_dataset


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The post-training stages the manifest configures (none without an SFT recipe or sizes)."""
    stages = manifest.stages
    # The manifest holds stages.pretrain whenever a size is pretrained here; base-model sizes need none.
    if stages.sft is None or not manifest.model_sizes:
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))
    op_tags = k8s_op_tags(manifest.compute.training)
    assets: list[dg.AssetsDefinition] = [sft_dataset]
    checks: list[dg.AssetChecksDefinition] = []

    @artifact_asset(partitions_def=model_sizes, code_version="1", kinds={"trl", "huggingface"},
                    group_name="posttrain", op_tags=op_tags, ins=_starting_model_ins(manifest),
                    description="The size's starting model (pretrain_checkpoint, or base_model for a size that "
                                "names one) fine-tuned on sft_dataset by trl's SFTTrainer (full or LoRA, merged).")
    def sft_model(context: dg.AssetExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource,
                  pipes_subprocess_client: dg.PipesSubprocessClient, sft_dataset: ArtifactHandle,
                  **starting_models: ArtifactHandle | dict[str, ArtifactHandle]) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        recipe = current.stages.sft
        starting_asset, starting_model = _starting_model(context.partition_key, starting_models)

        def work() -> StageWork:
            return StageWork(stage="sft", recipe=recipe.model_dump(mode="json"), seed=current.seed,
                             title=f"SFT {context.partition_key}",
                             model_dir=str(store.local_dir(starting_model.sha256)),
                             dataset_dir=str(store.local_dir(sft_dataset.sha256)))

        def finish(figures: dict[str, Any], out: Path) -> dict[str, Any]:
            from llm_assets.posttrain.lora import store_adapter

            adapter_dir = figures.pop(ADAPTER_DIR, None)
            return store_adapter(store, Path(adapter_dir), starting_model.sha256, out) if adapter_dir else {}

        return trl_step(context, artifact_store, pipes_subprocess_client, _processes(current), work,
                        config={"recipe": recipe, "seed": current.seed},
                        inputs={starting_asset: starting_model, "sft_dataset": sft_dataset}, finish=finish)

    assets.append(sft_model)
    checks.append(_metric_gate(
        sft_model, SFT_VAL_LOSS_GATE, "val_loss",
        f"Val loss on the SFT val set within gates.{SFT_VAL_LOSS_GATE}: at most its max, and below the base "
        "(pretrained) model's on the same rows by its margin.",
        {"base": "base_val_loss"},
    ))

    if stages.constitution is not None:
        assets.append(_cai_dataset(model_sizes, op_tags))

    if stages.reward is not None or stages.policy is not None:
        assets.append(preference_dataset)

    if stages.reward is not None:
        @artifact_asset(partitions_def=model_sizes, code_version="1", kinds={"trl", "huggingface"},
                        group_name="posttrain", op_tags=op_tags,
                        description="A scalar-head reward model trained from the SFT model by trl's RewardTrainer.")
        def reward_model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                         artifact_store: ArtifactStoreResource, pipes_subprocess_client: dg.PipesSubprocessClient,
                         sft_model: ArtifactHandle, preference_dataset: ArtifactHandle) -> dg.Output[ArtifactHandle]:
            store, current = artifact_store.get_store(), pipeline.load()
            recipe = current.stages.reward

            def work() -> StageWork:
                return StageWork(stage="reward", recipe=recipe.model_dump(mode="json"), seed=current.seed,
                                 title=f"reward {context.partition_key}",
                                 model_dir=str(store.local_dir(sft_model.sha256)),
                                 dataset_dir=str(store.local_dir(preference_dataset.sha256)))

            return trl_step(context, artifact_store, pipes_subprocess_client, _processes(current), work,
                            config={"recipe": recipe, "seed": current.seed},
                            inputs={"sft_model": sft_model, "preference_dataset": preference_dataset})

        assets.append(reward_model)
        checks.append(_metric_gate(
            reward_model, REWARD_ACCURACY_GATE, "accuracy",
            f"Held-out pairwise accuracy (chosen scored above rejected) within gates.{REWARD_ACCURACY_GATE}: at "
            "least its min, and above the untrained reward model's on the same pairs by its margin.",
            {"untrained": "accuracy_before_training"},
        ))

    if stages.policy is not None:
        uses_reward = stages.policy.algorithm == "grpo"
        # cai_dataset's pairs, when the policy trains on them (its partition of the same size).
        cai_in = {"cai_dataset": dg.AssetIn()} if "cai_dataset" in stages.policy.preferences else {}

        @artifact_asset(partitions_def=model_sizes, code_version="1", kinds={"trl", "huggingface"},
                        group_name="posttrain", op_tags=op_tags, ins=cai_in or None,
                        description="The SFT model aligned on its preferences (preference_dataset, cai_dataset): DPO "
                                    "against the SFT model as reference, or GRPO scored by the reward model.")
        def policy(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                   artifact_store: ArtifactStoreResource, pipes_subprocess_client: dg.PipesSubprocessClient,
                   sft_model: ArtifactHandle, preference_dataset: ArtifactHandle, reward_model: ArtifactHandle,
                   **cai_ins: ArtifactHandle | dict[str, ArtifactHandle]) -> dg.Output[ArtifactHandle]:
            store, current = artifact_store.get_store(), pipeline.load()
            recipe = current.stages.policy
            # An input declared through `ins` is loaded as every partition by key: this size's.
            cai = {name: value if isinstance(value, ArtifactHandle) else value[context.partition_key]
                   for name, value in cai_ins.items()}

            def work() -> StageWork:
                return StageWork(stage="policy", recipe=recipe.model_dump(mode="json"), seed=current.seed,
                                 title=f"policy {context.partition_key}",
                                 model_dir=str(store.local_dir(sft_model.sha256)),
                                 dataset_dir=str(store.local_dir(preference_dataset.sha256)),
                                 reward_dir=str(store.local_dir(reward_model.sha256)) if uses_reward else None,
                                 cai_dir=str(store.local_dir(cai["cai_dataset"].sha256)) if cai else None)

            inputs = {"sft_model": sft_model, "preference_dataset": preference_dataset, **cai}
            # DPO does not read the reward model: it stays in the lineage (the policy waits for the
            # reward gate) but out of the fingerprint, so retraining the reward model keeps DPO cached.
            scored_by = {"reward_model": reward_model}
            return trl_step(context, artifact_store, pipes_subprocess_client, _processes(current), work,
                            config={"recipe": recipe, "seed": current.seed},
                            inputs={**inputs, **(scored_by if uses_reward else {})},
                            narrowed_inputs=None if uses_reward else scored_by,
                            input_files=None if uses_reward else {"reward_model": ()},
                            finish=lambda figures, out: {"reference_sha256": sft_model.sha256})

        assets.append(policy)
        checks.append(_metric_gate(
            policy, POLICY_KL_GATE, "kl_nats_per_sequence",
            f"KL(policy‖reference) on held-out prompts, nats per sequence, at most gates.{POLICY_KL_GATE}.max "
            "(the KL budget).",
        ))
    return dg.Definitions(assets=assets, asset_checks=checks)
