"""pretrain_checkpoint and scaling_law: the sweep over the manifest's model sizes.

Built from the manifest (the `model_size` partitions are its pretrained `model_sizes`; a size that names a
`base_model` is imported instead, see llm_assets/base_model), so the factory runs
when the Definitions load. Each size trains in its own process (torchrun's ranks when the
manifest's compute asks for several), launched through Dagster Pipes: rank 0 streams progress
into the run's log and reports the training figures (see `job.py`). Training resumes across
crashes and pods: every intermediate checkpoint is committed to the artifact store and recorded
under the step's fingerprint, and a rematerialization with the same fingerprint continues from
the last one.
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import dagster as dg
import torch

from llm_assets.artifacts import artifact_asset, fingerprint_of, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.checks.scope import materializations_under_check
from llm_assets.compute import k8s_op_tags
from llm_assets.launch import run_worker
from llm_assets.manifest import STAGE_GATES, PipelineManifest
from llm_assets.plots import loss_curve_markdown
from llm_assets.pretrain.job import RunSpec, StoreProgress
from llm_assets.pretrain.loop import TrainConfig
from llm_assets.pretrain.scaling import PARAMETERS_FITTED, fit_scaling_law
from llm_assets.tokenizer.packing import TOKENS_FILE, read_packed
from llm_assets.tracking import STEP_METRICS
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations
from resources.pipeline import PipelineResource

VAL_LOSS_GATE, _ = STAGE_GATES["pretrain"]
VAL_LOSS_BASELINES = ("untrained", "unigram")  # measured by the training job (loop.TrainResult.baseline_val_losses)


def launch_command(spec_path: Path, processes: int) -> list[str]:
    """The training job's command: the entry point itself, or torchrun starting it once per rank."""
    entry = ["-m", "llm_assets.pretrain", "--spec", str(spec_path)]
    if processes == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *entry]


def _training_figures(mat: dg.AssetMaterialization) -> Figures:
    """The val loss for its gate, with the untrained and unigram models' val losses on the same
    windows as the baselines it may be measured from; a loss that did not fall fails it too, and a
    non-finite loss makes the checkpoint unusable whatever a reviewer says (no override covers it)."""
    meta = {k: mat.metadata[k].value for k in ("initial_loss", "final_train_loss", "final_val_loss")}
    baselines = {kind: float(mat.metadata[f"{kind}_val_loss"].value) for kind in VAL_LOSS_BASELINES
                 if f"{kind}_val_loss" in mat.metadata}
    broken, problems = [], []
    if not all(math.isfinite(v) for v in meta.values()):
        broken.append(f"{mat.partition}: a loss is not finite ({meta})")
    elif meta["final_train_loss"] >= meta["initial_loss"]:
        problems.append(f"{mat.partition}: loss did not fall ({meta['initial_loss']} -> {meta['final_train_loss']})")
    return Figures(values={VAL_LOSS_GATE: meta["final_val_loss"]}, problems={VAL_LOSS_GATE: problems},
                   broken=broken, baselines={VAL_LOSS_GATE: baselines},
                   metadata={**meta, **{f"{kind}_val_loss": loss for kind, loss in baselines.items()}},
                   summary="losses finite, falling, within the gate")


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The training half of the sweep; nothing when the manifest has no pretrain recipe or sizes."""
    # A size that names a base model is imported (llm_assets/base_model), not pretrained.
    if manifest.stages.pretrain is None or not manifest.pretrained_sizes:
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.pretrained_sizes))

    @artifact_asset(
        partitions_def=model_sizes,
        ins={"token_shards": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
        code_version="2",  # 2: reports the untrained and unigram val losses the gate is measured from
        kinds={"pytorch", "huggingface"},
        group_name="pretrain",
        op_tags=k8s_op_tags(manifest.compute.training),
        description="A decoder-only model of one size trained by our torch loop; HF layout with its tokenizer.",
    )
    def pretrain_checkpoint(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
        token_shards: dict[str, ArtifactHandle],
        heldout_tokens: ArtifactHandle,
        tokenizer: ArtifactHandle,
    ) -> dg.Output[ArtifactHandle]:
        store = artifact_store.get_store()
        current = pipeline.load()
        recipe = current.stages.pretrain
        size_name = context.partition_key
        size = current.pretrained_sizes[size_name]
        cfg = TrainConfig.from_recipe(recipe, seed=current.seed)
        # How the ranks share the model (compute.training.parallelism) changes no artifact: it
        # stays out of the fingerprint, and goes to the job with the rest of the config.
        config = {"size": size, "train": cfg.model_dump(mode="json", exclude={"parallelism"})}
        inputs = {"token_shards": token_shards, "heldout_tokens": heldout_tokens, "tokenizer": tokenizer}
        fp = fingerprint_of(context, config, inputs)
        asset_name = context.asset_key.to_user_string()

        def build(out: Path) -> dict:
            train_bins = [store.local_dir(token_shards[k].sha256) / TOKENS_FILE for k in sorted(token_shards)]
            _, _, meta = read_packed(store.local_dir(token_shards[sorted(token_shards)[0]].sha256))
            store_config, secrets = artifact_store.for_child_process()
            processes = current.compute.training.processes(torch.cuda.device_count())
            with tempfile.TemporaryDirectory(prefix="llm-assets-train-") as scratch:
                spec = RunSpec(
                    model=size,
                    train=config["train"] | {"parallelism": current.compute.training.parallelism},
                    train_bins=[str(p) for p in train_bins if p.stat().st_size],
                    val_bins=[str(store.local_dir(heldout_tokens.sha256) / "val" / TOKENS_FILE)],
                    token_dtype=meta.dtype,
                    checkpoint_dir=str(Path(scratch) / "checkpoints"),
                    progress=StoreProgress(store=store_config, asset=asset_name, partition=size_name, fingerprint=fp),
                    export_dir=str(out),
                    tokenizer_dir=str(store.local_dir(tokenizer.sha256)),
                    error_file=str(Path(scratch) / "error.txt"),
                )
                spec_path = Path(scratch) / "spec.json"
                spec_path.write_text(spec.model_dump_json(indent=1))
                context.log.info(f"training {size_name} in {processes} process(es)")
                reported = run_worker(context, pipes_subprocess_client, launch_command(spec_path, processes),
                                      env=secrets, error_file=Path(spec.error_file), what=f"training {size_name}")
            return {
                "parameters": size.matmul_parameters(),
                **reported,
                "loss_curve": dg.MetadataValue.md(
                    loss_curve_markdown(
                        reported["loss_history"], [[v[0], v[2]] for v in reported["val_history"]], size_name
                    )
                ),
                "loss_history": dg.MetadataValue.json(reported["loss_history"]),
                "val_history": dg.MetadataValue.json(reported["val_history"]),
                STEP_METRICS: dg.MetadataValue.json(reported[STEP_METRICS]),
            }

        return materialize_artifact(
            context, store, kind="hf_model", config=config, inputs=inputs, build=build,
        )

    training_sane = gate_check(
        pretrain_checkpoint, name="training_sane", gates=[VAL_LOSS_GATE], read=_training_figures,
        description=f"Finite losses, the loss fell, and val loss within gates.{VAL_LOSS_GATE}: at most its max, "
                    "and below the untrained or unigram model's val loss on the same windows by its margin.",
    )

    @artifact_asset(
        ins={"pretrain_checkpoint": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
        code_version="1",
        kinds={"numpy"},
        group_name="pretrain",
        description="Power law of val loss in parameters and tokens over the sweep, with the next size up predicted.",
    )
    def scaling_law(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        pretrain_checkpoint: dict[str, ArtifactHandle],
    ) -> dg.Output[ArtifactHandle]:
        mats = latest_materializations(
            context.instance, dg.AssetKey("pretrain_checkpoint"), sorted(pretrain_checkpoint)
        )
        points = sorted(
            (float(m.metadata["parameters"].value), float(tokens), float(loss))
            for m in mats.values() for _, tokens, loss in m.metadata["val_history"].value
        )
        labels = {float(m.metadata["parameters"].value): p for p, m in mats.items()}

        def build(out: Path) -> dict:
            fit = fit_scaling_law(points)
            (out / "scaling_law.json").write_text(
                json.dumps({**fit.as_dict(), "points": points}, indent=1, sort_keys=True)
            )
            return {**fit.as_dict(), "plot": dg.MetadataValue.md(fit.plot_markdown(labels))}

        return materialize_artifact(
            context, artifact_store.get_store(), kind="scaling_law",
            inputs={"pretrain_checkpoint": pretrain_checkpoint},
            input_files={"pretrain_checkpoint": ()},  # the fit reads the checkpoints' metadata, not their files
            config={"points": points}, build=build,
        )

    @dg.asset_check(
        asset=scaling_law,
        description="Loss falls with size and with tokens (both exponents > 0), and the law fits: R² ≥ 0.9.",
    )
    def fit_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        mats = materializations_under_check(context, scaling_law.key, False)
        meta = {k: mats[0].metadata[k].value for k in ("alpha", "beta", "r_squared", "points_fitted")} if mats else {}
        problems = [] if meta else ["no scaling_law materialization"]
        if meta and meta["alpha"] <= 0:
            problems.append(f"alpha {meta['alpha']} ≤ 0: the larger sizes are not better at the same tokens")
        if meta and meta["beta"] <= 0:
            problems.append(f"beta {meta['beta']} ≤ 0: loss does not fall with tokens")
        # With no more points than parameters the fit is exact and R² says nothing.
        if meta and meta["points_fitted"] > PARAMETERS_FITTED and meta["r_squared"] < 0.9:
            problems.append(f"R² {meta['r_squared']} < 0.9 over {meta['points_fitted']} points")
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(problems) or f"alpha {meta['alpha']}, beta {meta['beta']}, R² {meta['r_squared']}",
            metadata=meta,
        )

    if len(manifest.pretrained_sizes) < 2:  # a power law needs a sweep: one size trains, nothing is fitted
        return dg.Definitions(assets=[pretrain_checkpoint], asset_checks=[training_sane])
    return dg.Definitions(assets=[pretrain_checkpoint, scaling_law], asset_checks=[training_sane, fit_quality])
