"""pretrain_checkpoint and scaling_law: the sweep over the manifest's model sizes.

Built from the manifest (the `model_size` partitions are its `model_sizes`), so the factory runs
when the Definitions load. Training resumes across crashes and pods: every intermediate
checkpoint is committed to the artifact store and recorded under the step's fingerprint, and a
rematerialization with the same fingerprint continues from the last one.
"""

import base64
import io
import json
import math
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import torch

from llm_assets.artifacts import artifact_asset, fingerprint_of, materialize_artifact
from llm_assets.checks.scope import materializations_under_check
from llm_assets.compute import k8s_op_tags
from llm_assets.costs import training_estimate
from llm_assets.manifest import PipelineManifest, PipelineResource
from llm_assets.pretrain.checkpoint import CheckpointError
from llm_assets.pretrain.data import TokenData
from llm_assets.pretrain.export import save_hf
from llm_assets.pretrain.loop import StepRecord, TrainConfig, train
from llm_assets.pretrain.model import build_model, flops_per_token
from llm_assets.pretrain.scaling import fit_power_law
from llm_assets.tokenizer.packing import TOKENS_FILE, read_packed
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations

VAL_LOSS_GATE = "pretrain_val_loss"


def measured_peak_flops(precision: str) -> float:
    """FLOP/s of a large matmul in the training precision on this device: the MFU denominator."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    reps, started = 8, time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - started)


def loss_plot_markdown(history: list[StepRecord], title: str) -> str:
    """The loss curve as an inline PNG, for the asset's metadata in the UI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=90)
    axis.plot([r.step for r in history], [r.loss for r in history], label="train", linewidth=1)
    evals = [r for r in history if r.val_loss is not None]
    axis.plot([r.step for r in evals], [r.val_loss for r in evals], "o-", label="val", markersize=3)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f"![loss curve](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def _spent_elsewhere(context: dg.AssetExecutionContext) -> float:
    """Dollars already spent by the current checkpoints of the other model sizes."""
    current = latest_materializations(context.instance, context.asset_key)
    return sum(
        float(mat.metadata["cost_usd"].value) for partition, mat in current.items()
        if partition != context.partition_key and "cost_usd" in mat.metadata
    )


def build_pretrain_assets(manifest: PipelineManifest) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """The training half of the sweep; nothing when the manifest has no pretrain recipe or sizes."""
    if manifest.stages.pretrain is None or not manifest.model_sizes:
        return [], []
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))

    @artifact_asset(
        partitions_def=model_sizes,
        ins={"token_shards": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
        code_version="1",
        kinds={"pytorch", "huggingface"},
        group_name="pretrain",
        op_tags=k8s_op_tags(manifest.compute.training),
        description="A decoder-only model of one size trained by our torch loop; HF layout with its tokenizer.",
    )
    def pretrain_checkpoint(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        token_shards: dict[str, ArtifactHandle],
        heldout_tokens: ArtifactHandle,
        tokenizer: ArtifactHandle,
    ) -> dg.Output[ArtifactHandle]:
        store = artifact_store.get_store()
        current = pipeline.load()
        recipe, budget = current.stages.pretrain, current.budget
        size_name = context.partition_key
        size = current.model_sizes[size_name]
        cfg = TrainConfig.from_recipe(recipe, seed=current.seed)
        estimate = training_estimate(size, recipe, budget)
        spent = _spent_elsewhere(context)
        if spent + estimate.usd > budget.usd_cap:
            raise dg.Failure(
                f"refused: training {size_name} is estimated at ${estimate.usd:.2f} "
                f"({estimate.gpu_hours:.2f} GPU-hours for {estimate.flops:.3g} FLOPs) and "
                f"${spent:.2f} is already spent, over budget.usd_cap ${budget.usd_cap:.2f}. "
                "Shrink the sweep or the steps, or raise the cap."
            )
        config = {"size": size, "train": cfg.__dict__ | {"betas": list(cfg.betas)}}
        inputs = {"token_shards": token_shards, "heldout_tokens": heldout_tokens, "tokenizer": tokenizer}
        fp = fingerprint_of(context, config, inputs)
        asset_name = context.asset_key.to_user_string()

        def build(out: Path) -> dict:
            train_bins = [store.local_dir(token_shards[k].sha256) / TOKENS_FILE for k in sorted(token_shards)]
            _, _, meta = read_packed(store.local_dir(token_shards[sorted(token_shards)[0]].sha256))
            val_root = store.local_dir(heldout_tokens.sha256) / "val"
            train_data = TokenData.from_bin_files([p for p in train_bins if p.stat().st_size], meta.dtype)
            val_data = TokenData.from_bin_files([val_root / TOKENS_FILE], meta.dtype)
            progress = store.progress_lookup(asset_name, size_name, fp)
            resume_from = store.local_dir(progress["artifact"], verify=True) if progress else None
            if progress:
                context.log.info(f"resuming {size_name} from the checkpoint of step {progress['step']}")
            model = build_model(size, seed=current.seed)
            started = time.perf_counter()

            def on_step(record: StepRecord) -> None:
                if record.step % max(1, cfg.steps // 20) == 0 or record.val_loss is not None:
                    val = f", val {record.val_loss:.4f}" if record.val_loss is not None else ""
                    context.log.info(f"{size_name} step {record.step}/{cfg.steps}: loss {record.loss:.4f}{val}")

            def on_checkpoint(path: Path, step: int) -> None:
                ref = store.put_dir(path)
                store.progress_record(asset_name, size_name, fp, ref.sha256, step)
                context.log.info(f"{size_name}: checkpoint of step {step} committed as {ref.sha256[:12]}")

            with tempfile.TemporaryDirectory(prefix="llm-assets-ckpt-") as scratch:
                try:
                    result = train(
                        model, train_data, val_data, cfg, checkpoint_dir=Path(scratch), resume_from=resume_from,
                        on_step=on_step, on_checkpoint=on_checkpoint,
                    )
                except CheckpointError as exc:
                    raise dg.Failure(f"{exc}; delete the progress entry or rematerialize from scratch") from exc
            save_hf(model, out, store.local_dir(tokenizer.sha256))
            wall = time.perf_counter() - started
            achieved = flops_per_token(size) * result.tokens_per_second
            peak = measured_peak_flops(result.precision)
            initial = result.history[0].loss if result.history else float("nan")
            return {
                "parameters": size.matmul_parameters(),
                "steps": result.steps_done,
                "resumed_from_step": result.resumed_from_step if result.resumed_from_step is not None else -1,
                "initial_loss": round(initial, 4),
                "final_train_loss": round(result.final_train_loss, 4),
                "final_val_loss": round(result.final_val_loss, 4) if result.final_val_loss is not None else float("nan"),
                "tokens_seen": result.tokens_seen,
                "tokens_per_second": round(result.tokens_per_second, 1),
                "achieved_flops_per_second": round(achieved, 1),
                "mfu": round(achieved / peak, 4),
                "measured_peak_flops_per_second": round(peak, 1),
                "precision": result.precision,
                "estimated_cost_usd": round(estimate.usd, 6),
                # On a laptop's CPU nothing is billed; on GPUs, the GPU-hours this step held.
                "cost_usd": round(wall / 3600 * budget.usd_per_gpu_hour * current.compute.training.gpus
                                  if torch.cuda.is_available() else 0.0, 6),
                "loss_curve": dg.MetadataValue.md(loss_plot_markdown(result.history, f"{size_name}")),
                "loss_history": dg.MetadataValue.json(
                    [[r.step, round(r.loss, 4)] for r in result.history[:: max(1, len(result.history) // 200)]]
                ),
            }

        return materialize_artifact(
            context, store, kind="hf_model", config=config, inputs=inputs, build=build,
        )

    @dg.asset_check(
        asset=pretrain_checkpoint,
        blocking=True,
        partitions_def=model_sizes,
        description=f"Finite losses, the loss fell, and val loss at most gates.{VAL_LOSS_GATE}.max.",
    )
    def training_sane(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
        gate = pipeline.load().gates.get(VAL_LOSS_GATE)
        problems, meta = [], {}
        for mat in materializations_under_check(context, pretrain_checkpoint.key, True):
            meta = {k: mat.metadata[k].value for k in ("initial_loss", "final_train_loss", "final_val_loss")}
            if not all(math.isfinite(v) for v in meta.values()):
                problems.append(f"{mat.partition}: a loss is not finite ({meta})")
            elif meta["final_train_loss"] >= meta["initial_loss"]:
                problems.append(f"{mat.partition}: loss did not fall ({meta['initial_loss']} -> {meta['final_train_loss']})")
            if gate is None or gate.max is None:
                problems.append(f"no threshold: set gates.{VAL_LOSS_GATE}.max in the manifest")
            elif meta.get("final_val_loss", math.inf) > gate.max:
                problems.append(f"{mat.partition}: val loss {meta['final_val_loss']} > gate {gate.max}")
        return dg.AssetCheckResult(
            passed=bool(meta) and not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(problems) or "losses finite, falling, within the gate",
            metadata={**meta, "gate_max_val_loss": gate.max if gate and gate.max is not None else float("nan")},
        )

    @artifact_asset(
        ins={"pretrain_checkpoint": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
        code_version="1",
        kinds={"numpy"},
        group_name="pretrain",
        description="Power law of final val loss against parameters over the model sizes, with the next size up predicted.",
    )
    def scaling_law(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        pretrain_checkpoint: dict[str, ArtifactHandle],
    ) -> dg.Output[ArtifactHandle]:
        mats = latest_materializations(context.instance, dg.AssetKey("pretrain_checkpoint"), sorted(pretrain_checkpoint))
        points = sorted(
            (int(m.metadata["parameters"].value), float(m.metadata["final_val_loss"].value), p) for p, m in mats.items()
        )

        def build(out: Path) -> dict:
            fit = fit_power_law(np.array([n for n, _, _ in points], float), np.array([l for _, l, _ in points]))
            (out / "scaling_law.json").write_text(json.dumps({**fit.as_dict(), "points": points}, indent=1, sort_keys=True))
            return {**fit.as_dict(), "plot": dg.MetadataValue.md(fit.plot_markdown([p for *_, p in points]))}

        return materialize_artifact(
            context, artifact_store.get_store(), kind="scaling_law", inputs={"pretrain_checkpoint": pretrain_checkpoint},
            config={"points": points}, build=build,
        )

    @dg.asset_check(asset=scaling_law, description="Loss falls with size (exponent > 0) and, with 3+ sizes, R² ≥ 0.9.")
    def fit_quality(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        mats = materializations_under_check(context, scaling_law.key, False)
        meta = {k: mats[0].metadata[k].value for k in ("alpha", "r_squared", "points_fitted")} if mats else {}
        passed = bool(meta) and meta["alpha"] > 0 and (meta["points_fitted"] < 3 or meta["r_squared"] >= 0.9)
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"alpha {meta.get('alpha')}, R² {meta.get('r_squared')} over {meta.get('points_fitted')} sizes",
            metadata=meta,
        )

    return [pretrain_checkpoint, scaling_law], [training_sane, fit_quality]
