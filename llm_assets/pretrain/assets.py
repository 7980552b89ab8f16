"""pretrain_checkpoint and scaling_law: the sweep over the manifest's model sizes; and
continued_pretrain_tokens, the corpus in a base model's own tokenizer.

Built from the manifest (the `model_size` partitions are its pretrained `model_sizes`; a size that
names a `base_model` is imported instead, see llm_assets/base_model, and has a checkpoint here only
when it sets `continued_pretraining`), so the factory runs when the Definitions load. Each size
trains in its own process (torchrun's ranks when the manifest's compute asks for several),
launched through Dagster Pipes: rank 0 streams progress into the run's log and reports the
training figures (see `job.py`). Training resumes across crashes and pods: every intermediate
checkpoint is committed to the artifact store and recorded under the step's fingerprint, and a
rematerialization with the same fingerprint continues from the last one.

Continued pretraining (a base-model size with `continued_pretraining: true`) runs the same job from
the imported model's weights (any causal architecture) on the corpus tokenized by the base model's
own tokenizer (`continued_pretrain_tokens`: the project's token shards are in the project's
tokenizer), and exports the checkpoint with that tokenizer, so every later stage reads it as it
reads the base model. Its val loss is judged against the base model's own on the same windows
(gates.continued_pretrain_val_loss, baseline `base`).
"""

import json
import math
import shutil
import tempfile
from pathlib import Path

import dagster as dg

from llm_assets.artifacts import artifact_asset, fingerprint_of, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.checks.scope import materializations_under_check
from llm_assets.compute import k8s_op_tags
from llm_assets.costs import base_model_figures
from llm_assets.data.dataset_splits import train_path
from llm_assets.launch import run_worker, torchrun_command
from llm_assets.manifest import CONTINUED_GATE, STAGE_GATES, PipelineManifest
from llm_assets.plots import loss_curve_markdown
from llm_assets.pretrain.scaling import PARAMETERS_FITTED, fit_scaling_law
from llm_assets.tokenizer.packing import TOKENS_FILE, read_packed
from llm_assets.tracking import STEP_METRICS
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations
from resources.pipeline import PipelineResource

VAL_LOSS_GATE, _ = STAGE_GATES["pretrain"]
VAL_LOSS_BASELINES = ("untrained", "unigram")  # measured by the training job (loop.TrainResult.baseline_val_losses)
# Continued pretraining: the job's "untrained" model is the base model as imported, reported as "base".
CONTINUED_BASELINES = ("base", "unigram")
# The base model's files that are not its weights or config: the tokenizer (and chat template,
# licence, card) its continued checkpoint is exported with.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def launch_command(spec_path: Path, processes: int) -> list[str]:
    """The training job's command: the entry point itself, or torchrun starting it once per rank."""
    return torchrun_command("llm_assets.pretrain", spec_path, processes)


def _training_figures(mat: dg.AssetMaterialization, continued: bool = False) -> Figures:
    """The val loss for its gate, with the untrained and unigram models' val losses on the same
    windows as the baselines it may be measured from; a loss that did not fall fails it too, and a
    non-finite loss makes the checkpoint unusable whatever a reviewer says (no override covers it).

    A `continued` checkpoint is judged by its own gate against the base model's val loss (and the
    unigram model's of its tokens); its train loss need not fall: a base model already fluent in
    the corpus's language may only hold its loss, which the gate against the base judges."""
    gate, kinds = (CONTINUED_GATE, CONTINUED_BASELINES) if continued else (VAL_LOSS_GATE, VAL_LOSS_BASELINES)
    meta = {k: mat.metadata[k].value for k in ("initial_loss", "final_train_loss", "final_val_loss")}
    baselines = {kind: float(mat.metadata[f"{kind}_val_loss"].value) for kind in kinds
                 if f"{kind}_val_loss" in mat.metadata}
    broken, problems = [], []
    if not all(math.isfinite(v) for v in meta.values()):
        broken.append(f"{mat.partition}: a loss is not finite ({meta})")
    elif not continued and meta["final_train_loss"] >= meta["initial_loss"]:
        problems.append(f"{mat.partition}: loss did not fall ({meta['initial_loss']} -> {meta['final_train_loss']})")
    return Figures(values={gate: meta["final_val_loss"]}, problems={gate: problems},
                   broken=broken, baselines={gate: baselines},
                   metadata={**meta, **{f"{kind}_val_loss": loss for kind, loss in baselines.items()}},
                   summary="losses finite, within the gate" if continued else "losses finite, falling, within the gate")


def _own_partition(value: ArtifactHandle | dict[str, ArtifactHandle], size: str) -> ArtifactHandle:
    """The handle of `size` in an input mapped to it alone (one handle, or a dict of the partitions)."""
    return value if isinstance(value, ArtifactHandle) else value[size]


def _model_ins(manifest: PipelineManifest) -> dict[str, dg.AssetIn]:
    """What pretrain_checkpoint reads: the project's tokens for the sizes pretrained here, the base
    model and its own tokens for the continued sizes. Dagster has no per-partition choice of
    parent: the base-model inputs are mapped to the continued sizes alone, and a pretrained size
    reads none of them; in a manifest with both kinds the unpartitioned project tokens are every
    size's parents, and a continued size ignores them (they are not in its fingerprint)."""
    ins = {}
    if manifest.pretrained_sizes:
        ins["token_shards"] = dg.AssetIn(partition_mapping=dg.AllPartitionMapping())
        ins["heldout_tokens"] = ins["tokenizer"] = dg.AssetIn()
    if manifest.continued_sizes:
        mapping = dg.StaticPartitionMapping({size: size for size in manifest.continued_sizes})
        ins["continued_pretrain_tokens"] = ins["base_model"] = dg.AssetIn(partition_mapping=mapping)
    return ins


def _continued_pretrain_tokens(manifest: PipelineManifest) -> dg.AssetsDefinition:
    @artifact_asset(
        partitions_def=dg.StaticPartitionsDefinition(sorted(manifest.continued_sizes)),
        ins={"base_model": dg.AssetIn(partition_mapping=dg.StaticPartitionMapping(
            {size: size for size in manifest.continued_sizes}))},
        code_version="1",
        kinds={"numpy"},
        group_name="pretrain",
        description="The train and val splits tokenized by a base model's own tokenizer (packed, eos after "
                    "each document): what its continued pretraining trains and is validated on.",
    )
    def continued_pretrain_tokens(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        base_model: ArtifactHandle,
        dataset_splits: ArtifactHandle,
    ) -> dg.Output[ArtifactHandle]:
        store = artifact_store.get_store()
        splits = sorted(entry.path for entry in store.manifest(dataset_splits.sha256).files)
        train_dir = Path(train_path("shard")).parent.as_posix()  # where every shard's training part is
        parts = {"train": [p for p in splits if Path(p).parent.as_posix() == train_dir],
                 "val": ["val.parquet"]}

        def build(out: Path) -> dict:
            from llm_assets.pretrain.data import pack_with_base_tokenizer  # torch: loads with the step

            root = store.local_dir(dataset_splits.sha256)
            counts = pack_with_base_tokenizer(store.local_dir(base_model.sha256),
                                              {split: [root / p for p in files] for split, files in parts.items()},
                                              out, batch_size=pipeline.load().stages.tokenizer.encode_batch)
            return {f"{split}_tokens": tokens for split, tokens in counts.items()}

        return materialize_artifact(context, store, kind="packed_tokens", config={"splits": parts},
                                    inputs={"base_model": base_model, "dataset_splits": dataset_splits},
                                    input_files={"dataset_splits": [p for files in parts.values() for p in files]},
                                    build=build)

    return continued_pretrain_tokens


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The training half of the sweep, and the continued pretraining of base-model sizes that ask
    for it; nothing when the manifest has no pretrain recipe or no such size."""
    # A size that names a base model is imported (llm_assets/base_model), and pretrained further only
    # when it sets continued_pretraining.
    if manifest.stages.pretrain is None or not manifest.checkpoint_sizes:
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.checkpoint_sizes))
    continued_sizes = set(manifest.continued_sizes)

    @artifact_asset(
        partitions_def=model_sizes,
        ins=_model_ins(manifest),
        code_version="2",  # 2: reports the untrained and unigram val losses the gate is measured from
        kinds={"pytorch", "huggingface"},
        group_name="pretrain",
        op_tags=k8s_op_tags(manifest.compute.training),
        description="A decoder-only model of one size trained by our torch loop (or a base model trained further "
                    "on the corpus); HF layout with its tokenizer.",
    )
    def pretrain_checkpoint(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
        **parents: ArtifactHandle | dict[str, ArtifactHandle],
    ) -> dg.Output[ArtifactHandle]:
        # torch loads with the step, not with the definitions.
        import torch

        from llm_assets.pretrain.job import RunSpec, StoreProgress
        from llm_assets.pretrain.loop import TrainConfig

        store = artifact_store.get_store()
        current = pipeline.load()
        recipe = current.stages.pretrain
        size_name = context.partition_key
        continued = size_name in current.continued_sizes
        cfg = TrainConfig.from_recipe(recipe, seed=current.seed)
        # How the ranks share the model (compute.training.parallelism) changes no artifact: it
        # stays out of the fingerprint, and goes to the job with the rest of the config.
        train_config = cfg.model_dump(mode="json", exclude={"parallelism"})
        if continued:
            # The base model is an input (its hash), not its location: a moved copy is the same model.
            base, tokens = (_own_partition(parents[k], size_name) for k in ("base_model", "continued_pretrain_tokens"))
            config = {"continued_pretraining": True, "train": train_config}
            inputs = {"base_model": base, "continued_pretrain_tokens": tokens}
            # Beside sizes pretrained here, the project's tokens are parents too: recorded for the
            # input-chain gate, out of the fingerprint, never read.
            narrowed = {k: parents[k] for k in ("token_shards", "heldout_tokens", "tokenizer") if k in parents}
            base_dir, tokens_dir = store.local_dir(base.sha256), store.local_dir(tokens.sha256)
            data = {"model": None, "base_model_dir": str(base_dir), "train_bins": [tokens_dir / "train" / TOKENS_FILE],
                    "val_bins": [str(tokens_dir / "val" / TOKENS_FILE)], "meta_dir": tokens_dir / "train",
                    "tokenizer_of": base_dir}
            parameters = base_model_figures(str(base_dir)).params
        else:
            size = current.pretrained_sizes[size_name]
            token_shards, heldout_tokens, tokenizer = (parents[k] for k in ("token_shards", "heldout_tokens",
                                                                              "tokenizer"))
            config = {"size": size, "train": train_config}
            inputs = {"token_shards": token_shards, "heldout_tokens": heldout_tokens, "tokenizer": tokenizer}
            narrowed = {}
            data = {"model": size, "base_model_dir": None,
                    "train_bins": [store.local_dir(token_shards[k].sha256) / TOKENS_FILE for k in sorted(token_shards)],
                    "val_bins": [str(store.local_dir(heldout_tokens.sha256) / "val" / TOKENS_FILE)],
                    "meta_dir": store.local_dir(token_shards[sorted(token_shards)[0]].sha256),
                    "tokenizer_dir": str(store.local_dir(tokenizer.sha256))}
            parameters = size.matmul_parameters()
        fp = fingerprint_of(context, config, inputs)
        asset_name = context.asset_key.to_user_string()

        def build(out: Path) -> dict:
            _, _, meta = read_packed(data["meta_dir"])
            store_config, secrets = artifact_store.for_child_process()
            processes = current.compute.training.processes(torch.cuda.device_count())
            with tempfile.TemporaryDirectory(prefix="llm-assets-train-") as scratch:
                tokenizer_dir = data["tokenizer_dir"] if not continued else \
                    str(_tokenizer_files(data["tokenizer_of"], Path(scratch) / "tokenizer"))
                spec = RunSpec(
                    model=data["model"],
                    base_model_dir=data["base_model_dir"],
                    train=config["train"] | {"parallelism": current.compute.training.parallelism},
                    train_bins=[str(p) for p in data["train_bins"] if p.stat().st_size],
                    val_bins=data["val_bins"],
                    token_dtype=meta.dtype,
                    checkpoint_dir=str(Path(scratch) / "checkpoints"),
                    progress=StoreProgress(store=store_config, asset=asset_name, partition=size_name, fingerprint=fp),
                    export_dir=str(out),
                    tokenizer_dir=tokenizer_dir,
                    error_file=str(Path(scratch) / "error.txt"),
                )
                spec_path = Path(scratch) / "spec.json"
                spec_path.write_text(spec.model_dump_json(indent=1))
                context.log.info(f"training {size_name} in {processes} process(es)"
                                 + (" from its base model" if continued else ""))
                reported = run_worker(context, pipes_subprocess_client, launch_command(spec_path, processes),
                                      env=secrets, error_file=Path(spec.error_file), what=f"training {size_name}")
            if continued and "untrained_val_loss" in reported:  # the job's model at step 0 is the base model
                reported["base_val_loss"] = reported.pop("untrained_val_loss")
            return {
                "parameters": parameters,
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
            narrowed_inputs=narrowed or None, input_files={name: () for name in narrowed} or None,
        )

    gates = ([VAL_LOSS_GATE] if manifest.pretrained_sizes else []) + ([CONTINUED_GATE] if continued_sizes else [])
    training_sane = gate_check(
        pretrain_checkpoint, name="training_sane", gates=gates,
        read=lambda mat: _training_figures(mat, continued=mat.partition in continued_sizes),
        description="; ".join(
            ([f"Finite losses, the loss fell, and val loss within gates.{VAL_LOSS_GATE}: at most its max, and "
              "below the untrained or unigram model's val loss on the same windows by its margin"]
             if manifest.pretrained_sizes else [])
            + ([f"a base model trained further: finite losses, and val loss within gates.{CONTINUED_GATE} against "
                "the base model's own val loss on the same windows"] if continued_sizes else [])) + ".",
    )
    extra = [_continued_pretrain_tokens(manifest)] if continued_sizes else []

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
        # A continued size's losses are in its base model's tokens: no point of this sweep.
        pretrained = sorted(k for k in pretrain_checkpoint if k not in continued_sizes)
        mats = latest_materializations(context.instance, dg.AssetKey("pretrain_checkpoint"), pretrained)
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
        return dg.Definitions(assets=[pretrain_checkpoint, *extra], asset_checks=[training_sane])
    return dg.Definitions(assets=[pretrain_checkpoint, scaling_law, *extra], asset_checks=[training_sane, fit_quality])


def _tokenizer_files(model_dir: Path, out: Path) -> Path:
    """The files of an imported model besides its weights and config (tokenizer, chat template,
    licence, card), copied into `out`: what its continued checkpoint is exported with."""
    out.mkdir(parents=True)
    for source in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if not source.name.endswith(".safetensors") and source.name not in MODEL_FILES:
            shutil.copyfile(source, out / source.name)
    return out
