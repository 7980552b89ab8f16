"""The loop's fine-tune (docs/monitoring.md): from a size's current release, on its users' feedback,
through the same eval gates, to a release candidate.

- `feedback_model[size]`: the current release's model fine-tuned with trl on `feedback_dataset`
  (SFT on liked answers and corrections; with `fine_tune.dpo`, DPO on the corrections over the
  answers they replace).
- `feedback_eval_report[size]`: the evaluation `eval_report` makes, of that model, with the same
  blocking `eval_gates`.
- `feedback_release[size]`: a release of it once every blocking check of its lineage passed (the
  drift gate's failure, which started the loop, does not hold it): promoted, or with a canary
  proposed as the candidate that `canary_report` promotes or rolls back.

Each runs by declarative automation when the asset before it lands and its dependencies' blocking
checks passed: a failed eval gate stops the chain before any release, and alerts.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

from llm_assets.artifacts import artifact_asset
from llm_assets.compute import k8s_op_tags
from llm_assets.evaluation.assets import eval_report_defs
from llm_assets.manifest import PipelineManifest
from llm_assets.monitoring.conditions import after_update
from llm_assets.monitoring.feedback import PREFERENCE_FILE, SFT_FILE
from llm_assets.posttrain.assets import train_step, training_metadata
from llm_assets.release.assets import current_model, release_asset
from llm_assets.release_pointer import (
    FINE_TUNED_FROM,
    READS_RELEASE_POINTER,
)
from llm_assets.retrain.examples import NotEnoughFeedback, feedback_examples
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

if TYPE_CHECKING:
    from llm_assets.posttrain.common import OnCheckpoint, OnLog

FEEDBACK_MODEL, FEEDBACK_EVAL, FEEDBACK_RELEASE = "feedback_model", "feedback_eval_report", "feedback_release"


def _read_feedback(path: Path) -> pl.DataFrame:
    """One of feedback_dataset's files (JSON lines; empty when no feedback gave such examples)."""
    return pl.read_ndjson(path) if path.stat().st_size else pl.DataFrame(
        schema={"id": pl.String, "prompt": pl.String, "completion": pl.String, "chosen": pl.String,
                "rejected": pl.String})


def configured(manifest: PipelineManifest) -> bool:
    monitoring = manifest.stages.monitoring
    return monitoring is not None and monitoring.fine_tune is not None and bool(manifest.model_sizes)


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """feedback_model and feedback_eval_report (feedback_release needs their lineage: `build_release_defs`)."""
    if not configured(manifest):
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))

    @artifact_asset(
        name=FEEDBACK_MODEL, partitions_def=model_sizes, code_version="1", kinds={"trl", "huggingface"},
        group_name="posttrain", op_tags=k8s_op_tags(manifest.compute.training), tags=READS_RELEASE_POINTER,
        ins={"feedback_dataset": dg.AssetIn(), "release": dg.AssetIn()},
        automation_condition=after_update(dg.AssetKey("feedback_dataset")),
        description="The size's current release fine-tuned by trl on its users' feedback (feedback_dataset): SFT on "
                    "liked answers and corrections, then optionally DPO on the corrections over the answers.",
    )
    def feedback_model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                       artifact_store: ArtifactStoreResource, feedback_dataset: ArtifactHandle,
                       release: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        recipe, size = current.stages.monitoring.fine_tune, context.partition_key
        step = f"{FEEDBACK_MODEL}[{size}]"
        released, model = current_model(store, step, size, release)

        def train(out: Path, work: Path, resume: Path | None, on_checkpoint: "OnCheckpoint", on_log: "OnLog") -> dict:
            # The trainers load with the step, not with the definitions.
            from llm_assets.posttrain.policy import run_policy
            from llm_assets.posttrain.sft import run_sft

            data = store.local_dir(feedback_dataset.sha256)
            try:
                examples = feedback_examples(_read_feedback(data / SFT_FILE), _read_feedback(data / PREFERENCE_FILE),
                                             recipe.val_fraction, f"feedback_dataset[{size}]")
            except NotEnoughFeedback as exc:
                raise dg.Failure(str(exc)) from None
            start = store.local_dir(model["sha256"], verify=True)
            dpo = recipe.dpo is not None and bool(examples.pairs_train)
            # The last trainer commits checkpoints and resumes: a resumed DPO re-runs the SFT before
            # it, which is deterministic (the same seed, rows and start) and short.
            sft_out = work / "sft" if dpo else out
            sft = run_sft(start, examples.sft_train, examples.sft_val, recipe.sft, sft_out, work / "sft-work",
                          seed=current.seed, resume_from=None if dpo else resume,
                          on_checkpoint=None if dpo else on_checkpoint, on_log=on_log)
            figures = {**training_metadata(sft.training, f"feedback SFT {size}"),
                       "sft_examples": len(examples.sft_train), "val_examples": len(examples.sft_val),
                       "val_loss": round(sft.val_loss, 4), "release_val_loss": round(sft.base_val_loss, 4)}
            if dpo:
                policy = run_policy(sft_out, None, examples.pairs_train, examples.pairs_val or examples.pairs_train,
                                    recipe.dpo, out, work / "dpo-work", seed=current.seed, resume_from=resume,
                                    on_checkpoint=on_checkpoint, on_log=on_log)
                figures.update({**training_metadata(policy.training, f"feedback DPO {size}"),
                                "preference_pairs": len(examples.pairs_train),
                                "kl_nats_per_sequence": round(policy.kl_nats_per_sequence, 6)})
            return {**figures, FINE_TUNED_FROM: released, "fine_tuned_model": model["sha256"]}

        return train_step(context, store, config={"recipe": recipe, "seed": current.seed, "release": released,
                                                  "model": model["sha256"]},
                          inputs={"feedback_dataset": feedback_dataset}, narrowed_inputs={"release": release},
                          input_files={"release": ()}, train=train)

    feedback_eval_report, eval_gates = eval_report_defs(
        manifest, name=FEEDBACK_EVAL, model_asset=FEEDBACK_MODEL, group_name="evaluation",
        automation_condition=after_update(feedback_model))
    return dg.Definitions(assets=[feedback_model, feedback_eval_report], asset_checks=[eval_gates])


def build_release_defs(manifest: PipelineManifest, lineage_graph: BaseAssetGraph) -> dg.Definitions:
    """feedback_release, with the asset graph of its lineage (the loop's assets and everything below)."""
    if not configured(manifest):
        return dg.Definitions()
    return dg.Definitions(assets=[release_asset(
        manifest, lineage_graph, name=FEEDBACK_RELEASE, model_asset=FEEDBACK_MODEL, eval_asset=FEEDBACK_EVAL,
        # The drift gate's failure is why the loop runs; every other blocking check holds it.
        not_holding=[dg.AssetCheckKey(dg.AssetKey("drift_report"), "drift_gates")], fine_tune_of=FINE_TUNED_FROM,
        automation_condition=after_update(dg.AssetKey(FEEDBACK_EVAL)),
        description="A release of feedback_model once every blocking gate of its lineage passed (its eval_gates "
                    "among them): promoted, or with a canary proposed as the candidate canary_report judges.")])
