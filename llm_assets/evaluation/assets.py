"""eval_report: the last trained model of each size (the policy, else the SFT model, else the
pretrained checkpoint) evaluated with lm-eval on the shipped held-out tasks and the manifest's
task directories, its refusal rate on the shipped red-team prompts, and the policy's KL to its
reference. Eval gates: every manifest gate named `task.metric` is a threshold on a figure of
the report, checked by the blocking `eval_gates` check.
"""

import tempfile
from pathlib import Path

import dagster as dg
import polars as pl
from transformers import AutoConfig

from llm_assets.artifacts import InputRead, artifact_asset, materialize_artifact, verify_inputs
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.compute import k8s_op_tags
from llm_assets.evaluation.harness import run_lm_eval
from llm_assets.evaluation.report import EvalReport
from llm_assets.evaluation.safety import load_red_team_prompts, refusal_rate
from llm_assets.evaluation.tasks import TaskSetupError, write_builtin_tasks
from llm_assets.manifest import PipelineManifest
from llm_assets.release_pointer import RELEASE_JSON, current_release, read_release
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations
from resources.pipeline import PipelineResource

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def evaluated_stage(manifest: PipelineManifest) -> str:
    """The model asset eval_report reads: the last training stage the manifest configures."""
    stages = manifest.stages
    return "policy" if stages.policy else "sft_model" if stages.sft else "pretrain_checkpoint"


def eval_gate_names(manifest: PipelineManifest) -> list[str]:
    return sorted(name for name in manifest.gates if "." in name)


def promoted_report(store, partition: str) -> tuple[str, EvalReport] | None:
    """The eval report of the release currently promoted for this model size, with its hash; the
    release document and the report are verified against their hashes before they are read."""
    release_sha = current_release(store, partition)
    if release_sha is None:
        return None
    step = f"eval_report[{partition}]"
    verify_inputs(store, step, [InputRead("release", partition, release_sha, (RELEASE_JSON,))])
    record = read_release(store, release_sha)["eval_report"]
    sha = record["sha256"]
    verify_inputs(store, step, [InputRead(record["asset"], record["partition"], sha, (REPORT_JSON,))])
    return sha, EvalReport.from_json(store.read_bytes(sha, REPORT_JSON).decode())


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    recipe = manifest.stages.evaluation
    if recipe is None or not manifest.model_sizes:
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))
    model_asset = evaluated_stage(manifest)

    @artifact_asset(
        partitions_def=model_sizes, code_version="1", kinds={"lm_eval"}, group_name="evaluation",
        ins={"model": dg.AssetIn(key=model_asset)}, op_tags=k8s_op_tags(manifest.compute.training),
        description=f"lm-eval on held-out tasks (+ the manifest's), refusal rate and KL of {model_asset}; "
                    "JSON and a markdown table, with the change against the previous report.",
    )
    def eval_report(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                    artifact_store: ArtifactStoreResource, model: ArtifactHandle,
                    dataset_splits: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        recipe = current.stages.evaluation
        model_mat = latest_materializations(context.instance, dg.AssetKey(model_asset), [context.partition_key])
        kl = model_mat[context.partition_key].metadata.get("kl_nats_per_sequence") if model_mat else None

        def build(out: Path) -> dict:
            model_dir = store.local_dir(model.sha256)
            test = pl.read_parquet(store.local_dir(dataset_splits.sha256) / "test.parquet")
            with tempfile.TemporaryDirectory(prefix="llm-assets-tasks-") as tasks_dir:
                try:
                    # A byte-level BPE token holds at least one byte: answers of at most half the
                    # model's positions always fit next to a (left-truncated) question.
                    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
                    names = write_builtin_tasks(
                        test, Path(tasks_dir), seed=current.seed, max_docs=recipe.max_docs,
                        max_answer_chars=min(200, positions // 2), max_target_chars=min(80, positions // 4),
                        max_gen_toks=min(48, positions // 4))
                    context.log.info(f"evaluating {model_asset}[{context.partition_key}] on {names + recipe.tasks}")
                    harness = run_lm_eval(model_dir, [*names, *recipe.tasks],
                                          [Path(tasks_dir), *map(Path, recipe.task_dirs)],
                                          batch_size=recipe.batch_size, limit=recipe.limit, seed=current.seed)
                except TaskSetupError as exc:
                    raise dg.Failure(str(exc)) from None
            safety = refusal_rate(model_dir, load_red_team_prompts(), max_new_tokens=recipe.safety_max_new_tokens,
                                  batch_size=recipe.batch_size)
            report = EvalReport.from_harness(
                harness, safety=safety, extra={"kl_nats_per_sequence": float(kl.value)} if kl is not None else {})
            (out / REPORT_JSON).write_text(report.to_json())
            (out / REPORT_MD).write_text(report.to_markdown())
            return {f"{task}.{metric}": value for task, values in report.figures().items()
                    for metric, value in values.items()}

        # The change against the last promoted report is presentation, not part of the artifact
        # (read, and verified, before anything is built).
        promoted = promoted_report(store, context.partition_key)
        result = materialize_artifact(
            context, store, kind="eval_report", build=build,
            config={"recipe": recipe, "seed": current.seed},
            inputs={"model": model, "dataset_splits": dataset_splits},
            input_files={"dataset_splits": ["test.parquet"]},  # the held-out tasks are built from it alone
        )
        report = EvalReport.from_json(store.read_bytes(result.value.sha256, REPORT_JSON).decode())
        against = f"the current release's report {promoted[0][:12]}" if promoted else ""
        return dg.Output(result.value, data_version=result.data_version, metadata={
            **result.metadata, "compared_with": against or "no release yet",
            "figures": report.figures_table(),
            "report": dg.MetadataValue.md(report.to_markdown(promoted[1] if promoted else None, against)),
        })

    gate_names = eval_gate_names(manifest)

    def report_figures(mat: dg.AssetMaterialization) -> Figures:
        figures, missing = {}, {}
        for name in gate_names:
            entry = mat.metadata.get(name)
            figures[name] = float(entry.value) if entry is not None else float("nan")
            if entry is None:
                missing[name] = [f"{mat.partition}: the report has no figure {name}; gate names are task.metric "
                                 f"(it has: {', '.join(sorted(k for k in mat.metadata if '.' in k))})"]
        return Figures(values=figures, problems=missing, summary=f"{len(figures)} eval gate(s) hold")

    eval_gates = gate_check(eval_report, name="eval_gates", gates=gate_names, read=report_figures,
                            description="Every manifest gate named task.metric holds for the report's figure.")

    return dg.Definitions(assets=[eval_report], asset_checks=[eval_gates])
