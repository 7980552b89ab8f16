"""quantized_model[model_size × scheme]: the model eval_report evaluates, quantized; and the
blocking check that its quality on held-out text stays within the manifest's gates.

The asset picks the texts (GPTQ calibration from the training split, the held-out set from the
test split), writes them with a spec, and hands it to the quantization environment's long-lived
worker (see `llm_assets/quantize/__init__.py` and `resources.quantize_environment`); the worker's
figures become the materialization's metadata, and the check reads them.
"""

import hashlib
import json
import tempfile
from pathlib import Path

import dagster as dg
import polars as pl

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.compute import k8s_op_tags
from llm_assets.evaluation.assets import evaluated_stage
from llm_assets.manifest import QUANTIZE_GATES, PipelineManifest
from llm_assets.quantize.worker import QuantizeSpec
from llm_assets.tracing import phase
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource
from resources.quantize_environment import QuantizeEnvironmentResource

SIZE, SCHEME = "model_size", "scheme"  # the partition dimensions


def pick_texts(paths: list[Path], count: int, seed: int) -> list[str]:
    """`count` texts of parquet files of documents (id, text), chosen by a seeded hash of the id:
    the same documents give the same texts in the same order, however they are sharded. Only
    the ids are read whole; the texts of the chosen documents are read by a filtered scan."""
    if not paths:
        return []
    ids = pl.scan_parquet(paths).select("id").collect()["id"].to_list()
    chosen = sorted(ids, key=lambda doc_id: hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest())[:count]
    found = pl.scan_parquet(paths).filter(pl.col("id").is_in(chosen)).select("id", "text").collect()
    texts = dict(found.iter_rows())
    return [texts[doc_id] for doc_id in chosen]


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def comparison_table(figures: dict, scheme: str) -> dg.TableMetadataValue:
    """Full precision and quantized side by side, for the asset's page in the UI: a row per figure,
    its value in each model and the change (relative for perplexity, absolute for accuracy, a
    ratio for the weights)."""
    rows = [
        ("perplexity", figures["full_precision_perplexity"], figures["quantized_perplexity"],
         f"{figures['perplexity_increase']:+.3%}"),
        ("top-1 accuracy", figures["full_precision_token_accuracy"], figures["quantized_token_accuracy"],
         f"{-figures['accuracy_drop'] + 0.0:+.4f}"),
        ("top-1 agreement with full precision", 1.0, figures["top1_agreement"], ""),
        ("weights (MB)", figures["full_precision_weight_bytes"] / 1e6, figures["quantized_weight_bytes"] / 1e6,
         f"× {figures['size_ratio']}"),
    ]

    def number(value: float) -> float | str:
        """Rounded as the UI shows it; a non-finite figure (a diverged model's perplexity) as text,
        since the UI reads records as JSON."""
        return round(float(value), 4) if abs(float(value)) < float("inf") else str(float(value))

    columns = [
        dg.TableColumn("figure", "string", description=f"on {figures['heldout_tokens']} held-out tokens"),
        dg.TableColumn("full_precision", "float"),
        dg.TableColumn("quantized", "float", description=scheme),
        dg.TableColumn("change", "string", description="quantized against full precision"),
    ]
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"figure": name, "full_precision": number(full), "quantized": number(quantized),
                                 "change": change}) for name, full, quantized, change in rows],
        schema=dg.TableSchema(columns=columns),
    )


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    recipe = manifest.stages.quantize
    if recipe is None or not manifest.model_sizes:
        return dg.Definitions()
    partitions = dg.MultiPartitionsDefinition({
        SIZE: dg.StaticPartitionsDefinition(sorted(manifest.model_sizes)),
        SCHEME: dg.StaticPartitionsDefinition(list(recipe.schemes)),
    })
    model_asset = evaluated_stage(manifest)
    gate_names = [name for name in QUANTIZE_GATES if name in manifest.gates]

    @artifact_asset(
        partitions_def=partitions, code_version="3", kinds={"pytorch", "huggingface"}, group_name="quantize",
        # Dagster maps each model_size × scheme partition to its model_size partition of the model.
        ins={"model": dg.AssetIn(key=model_asset), "dataset_splits": dg.AssetIn()},
        op_tags=k8s_op_tags(manifest.compute.training),
        description=f"{model_asset} quantized (GPTQ 4-bit with gptqmodel, calibrated on the training split; int8 "
                    "weight-only with torchao); transformers loads it. Held-out perplexity, accuracy and size "
                    "against the full-precision model.",
    )
    def quantized_model(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
        quantize_environment: QuantizeEnvironmentResource,
        model: ArtifactHandle,
        dataset_splits: ArtifactHandle,
    ) -> dg.Output[ArtifactHandle]:
        # torch and transformers load with the step, not with the definitions.
        import torch
        from transformers import AutoConfig

        store, current = artifact_store.get_store(), pipeline.load()
        recipe = current.stages.quantize
        keys = context.partition_key.keys_by_dimension
        size, scheme = keys[SIZE], keys[SCHEME]
        gptq = scheme == "gptq-4bit"
        config = {
            "scheme": scheme, "seed": current.seed, "heldout_texts": recipe.heldout_texts,
            "max_tokens": recipe.max_tokens,
            **({"group_size": recipe.group_size, "calibration_texts": recipe.calibration_texts} if gptq else {}),
            # Another library version, or the GPU instead of the CPU, may write other bytes.
            "libraries": quantize_environment.libraries(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }

        def build(out: Path) -> dict:
            model_dir, splits = store.local_dir(model.sha256), store.local_dir(dataset_splits.sha256)
            max_tokens = min(recipe.max_tokens, AutoConfig.from_pretrained(model_dir).max_position_embeddings)
            with tempfile.TemporaryDirectory(prefix="llm-assets-quantize-") as scratch:
                work = Path(scratch)
                train_files = sorted((splits / "train").glob("*.parquet"))
                heldout = pick_texts([splits / "test.parquet"], recipe.heldout_texts, current.seed)
                calibration = pick_texts(train_files, recipe.calibration_texts, current.seed) if gptq else []
                if not heldout or (gptq and not calibration):
                    raise dg.Failure(f"dataset_splits {dataset_splits.sha256[:12]} has no "
                                     f"{'test' if not heldout else 'training'} documents to quantize with; "
                                     "check the splits' fractions in stages.splits")
                spec = QuantizeSpec(
                    scheme=scheme, model_dir=str(model_dir), out_dir=str(out), max_tokens=max_tokens,
                    heldout=str(write_texts(work / "heldout.jsonl", heldout)),
                    calibration=str(write_texts(work / "calibration.jsonl", calibration)) if gptq else None,
                    group_size=recipe.group_size, seed=current.seed, error_file=str(work / "error.txt"),
                )
                spec_path = work / "spec.json"
                spec_path.write_text(spec.model_dump_json(indent=1))
                context.log.info(f"quantizing {model_asset}[{size}] {model.sha256[:12]} ({scheme}) in "
                                 f"{quantize_environment.python}")
                with phase("quantize"):  # the worker, in its own environment: the heavy part of the step's trace
                    reported = quantize_environment.quantize(spec_path, context.log.info,
                                                             error_file=work / "error.txt",
                                                             what=f"quantizing {model_asset}[{size}] ({scheme})")
            return {**reported, "model_sha256": model.sha256,
                    "comparison": comparison_table(reported, scheme),
                    "libraries": dg.MetadataValue.json(reported["libraries"])}

        return materialize_artifact(context, store, kind="hf_model", build=build, config=config,
                                    inputs={"model": model, "dataset_splits": dataset_splits})

    def quality_figures(mat: dg.AssetMaterialization) -> Figures:
        figure = {k: float(mat.metadata[k].value)
                  for k in ("perplexity_increase", "accuracy_drop", "top1_agreement", "size_ratio", "quantized_layers")}
        # Not quantized, or not smaller, is a broken artifact: no reviewer's override covers that.
        broken = []
        if figure["quantized_layers"] < 1:
            broken.append(f"{mat.partition}: no layer is stored quantized")
        if figure["size_ratio"] >= 1:
            broken.append(f"{mat.partition}: the quantized weights are not smaller (size ratio {figure['size_ratio']})")
        return Figures(
            values={name: figure["perplexity_increase" if name == "quantized_perplexity_increase" else "accuracy_drop"]
                    for name in gate_names},
            broken=broken, metadata={"size_ratio": figure["size_ratio"]},
            summary=f"perplexity {figure['perplexity_increase']:+.4%}, token accuracy "
                    f"{-figure['accuracy_drop'] + 0.0:+.4f}, top-1 agreement with full precision "
                    f"{figure['top1_agreement']:.4f}, size ratio {figure['size_ratio']}",
        )

    quantization_quality = gate_check(
        quantized_model, name="quantization_quality", gates=gate_names, read=quality_figures,
        description="The quantized model loads, is quantized and smaller, and its held-out quality is within "
                    f"the gates {', '.join(gate_names)} of the full-precision model's.",
    )

    return dg.Definitions(assets=[quantized_model], asset_checks=[quantization_quality])
