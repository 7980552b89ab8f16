"""eval_report: the last trained model of each size (the policy, else the SFT model, else the
pretrained checkpoint) evaluated with lm-eval on the shipped held-out tasks and the manifest's
task directories, its refusal rates on the shipped red-team and everyday prompts, and the policy's
KL to its reference, and the bits per byte of a unigram model of the training data on the same
held-out documents. A size pretrained here is measured with the project's tokenizer (its unigram
model counts the training token shards); a size started from a base model with the model's own
tokenizer and chat template (its unigram model counts the training split encoded by that
tokenizer; the project's tokenizer and shards are not read). Eval gates: every manifest gate
named `task.metric` is a threshold on a figure of the report, checked by the blocking `eval_gates`
check; a gate with `baseline: unigram` is measured from that unigram figure.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from llm_assets.artifacts import InputRead, artifact_asset, materialize_artifact, verify_inputs
from llm_assets.checks.gate_check import Figures, gate_check
from llm_assets.compute import k8s_op_tags
from llm_assets.evaluation.contamination import eval_contamination_gate
from llm_assets.evaluation.report import EvalReport
from llm_assets.evaluation.safety import BENIGN_FILE, RED_TEAM_FILE, load_prompts, refusal_rate
from llm_assets.evaluation.tasks import PERPLEXITY, TaskSetupError, perplexity_texts, write_builtin_tasks
from llm_assets.manifest import LIVE_GATE_PREFIXES, PipelineManifest
from llm_assets.prompts import chat_renderer, has_chat_template, parse_prompt
from llm_assets.release_pointer import RELEASE_JSON, current_release, read_release
from llm_assets.tokenizer.assets import TOKENIZER_FILE, stored_tokenizer
from llm_assets.tokenizer.packing import INDEX_FILE, META_FILE, TOKENS_FILE
from llm_assets.tracing import phase
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, latest_materializations
from resources.pipeline import PipelineResource

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

REPORT_JSON, REPORT_MD = "report.json", "report.md"
BITS_PER_BYTE = f"{PERPLEXITY}.bits_per_byte"
BASELINES_KEY = "baselines"  # eval_report metadata: task.metric → kind → the reference model's figure


def evaluated_stage(manifest: PipelineManifest) -> str:
    """The model asset eval_report reads: the last training stage the manifest configures."""
    stages = manifest.stages
    return "policy" if stages.policy else "sft_model" if stages.sft else "pretrain_checkpoint"


def eval_gate_names(manifest: PipelineManifest) -> list[str]:
    # canary.* and drift.* are judged on served traffic by their own stages' checks.
    return sorted(name for name in manifest.gates if "." in name and not name.startswith(LIVE_GATE_PREFIXES))


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


def report_metadata(report: EvalReport) -> dict[str, float | dg.MetadataValue]:
    """What an eval_report materialization records for its gates: every figure under its name
    task.metric, and the baselines measured for them (read back by `report_reader`)."""
    return {**report.named_figures(), BASELINES_KEY: dg.MetadataValue.json(report.baselines)}


def report_reader(gate_names: list[str]) -> Callable[[dg.AssetMaterialization], Figures]:
    """What eval_gates reads off an eval_report materialization: the figure of every gate named
    task.metric (a gate naming a figure the report lacks fails), with the baselines the report
    measured for it (a gate relative to one it did not measure fails, naming those it did)."""

    def report_figures(mat: dg.AssetMaterialization) -> Figures:
        recorded = mat.metadata.get(BASELINES_KEY)
        measured = recorded.value if recorded is not None else {}
        figures, missing = {}, {}
        for name in gate_names:
            entry = mat.metadata.get(name)
            figures[name] = float(entry.value) if entry is not None else float("nan")
            if entry is None:
                missing[name] = [f"{mat.partition}: the report has no figure {name}; gate names are task.metric "
                                 f"(it has: {', '.join(sorted(k for k in mat.metadata if '.' in k))})"]
        return Figures(values=figures, problems=missing, summary=f"{len(figures)} eval gate(s) hold",
                       baselines={name: measured.get(name, {}) for name in gate_names})

    return report_figures


def _project_token_ins(manifest: PipelineManifest) -> dict[str, dg.AssetIn]:
    """The project's tokenizer and token shards, read by the sizes pretrained here (their unigram
    baseline); a manifest of base-model sizes only does not depend on them."""
    if not manifest.pretrained_sizes:
        return {}
    return {"token_shards": dg.AssetIn(partition_mapping=dg.AllPartitionMapping()), "tokenizer": dg.AssetIn()}


def _template_renderer(tokenizer: "PreTrainedTokenizerBase") -> Callable[[str], str] | None:
    """What re-renders the held-out questions (stored in the project's prompt format) in the
    tokenizer's chat template, as the model was fine-tuned; None when it has no template."""
    if not has_chat_template(tokenizer):
        return None
    render = chat_renderer(tokenizer)
    return lambda prompt: render(parse_prompt(prompt))


def _backend(tokenizer: "PreTrainedTokenizerBase", model_dir: Path) -> "Tokenizer":
    """The `tokenizers.Tokenizer` behind a model's fast tokenizer (the unigram baseline encodes with it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise dg.Failure(f"{model_dir}: the model's tokenizer ({type(tokenizer).__name__}) has no fast "
                         "(tokenizers) backend, which the unigram baseline encodes with; add its tokenizer.json")
    return backend


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    if manifest.stages.evaluation is None or not manifest.model_sizes:
        return dg.Definitions()
    eval_report, eval_gates = eval_report_defs(manifest, name="eval_report", model_asset=evaluated_stage(manifest),
                                               group_name="evaluation")
    return dg.Definitions(assets=[eval_report], asset_checks=[eval_gates, eval_contamination_gate])


def eval_report_defs(manifest: PipelineManifest, *, name: str, model_asset: str, group_name: str,
                     automation_condition: dg.AutomationCondition | None = None,
                     ) -> tuple[dg.AssetsDefinition, dg.AssetChecksDefinition]:
    """An evaluation of `model_asset` (per model size) and its blocking `eval_gates`: `eval_report`
    of the graph's last training stage, and the same evaluation of any other model of a size (the
    loop's fine-tune), judged by the same gates."""
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))

    @artifact_asset(
        # 2: the refusal rate on everyday prompts (safety.benign_refusal_rate) beside the red-team one
        # 3: the unigram model's bits per byte on the perplexity documents (the report's baselines)
        name=name, partitions_def=model_sizes, code_version="3", kinds={"lm_eval"}, group_name=group_name,
        ins={"model": dg.AssetIn(key=model_asset), **_project_token_ins(manifest)},
        op_tags=k8s_op_tags(manifest.compute.training), automation_condition=automation_condition,
        description=f"lm-eval on held-out tasks (+ the manifest's), refusal rate and KL of {model_asset}, and "
                    "a unigram model's bits per byte on the same documents; JSON and a markdown table, with the "
                    "change against the current release's report.",
    )
    def eval_report(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                    artifact_store: ArtifactStoreResource, model: ArtifactHandle,
                    dataset_splits: ArtifactHandle, **project_tokens: ArtifactHandle | dict[str, ArtifactHandle],
                    ) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        own_tokenizer = context.partition_key in current.base_model_sizes
        recipe = current.stages.evaluation
        model_mat = latest_materializations(context.instance, dg.AssetKey(model_asset), [context.partition_key])
        kl = model_mat[context.partition_key].metadata.get("kl_nats_per_sequence") if model_mat else None

        def build(out: Path) -> dict:
            # The evaluation's libraries (torch, transformers, lm-eval) load when it runs, not with the definitions.
            from transformers import AutoConfig

            from llm_assets.evaluation.harness import run_lm_eval
            from llm_assets.evaluation.unigram import shard_log_probs, text_log_probs, unigram_bits_per_byte
            from llm_assets.hf_models import load_tokenizer

            model_dir, splits_dir = store.local_dir(model.sha256), store.local_dir(dataset_splits.sha256)
            test = pl.read_parquet(splits_dir / "test.parquet")
            hf_tokenizer = load_tokenizer(model_dir) if own_tokenizer else None
            render = _template_renderer(hf_tokenizer) if hf_tokenizer is not None else None
            with tempfile.TemporaryDirectory(prefix="llm-assets-tasks-") as tasks_dir:
                try:
                    # A byte-level BPE token holds at least one byte: answers of at most half the
                    # model's positions always fit next to a (left-truncated) question.
                    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
                    names = write_builtin_tasks(
                        test, Path(tasks_dir), seed=current.seed, max_docs=recipe.max_docs,
                        max_answer_chars=min(200, positions // 2), max_target_chars=min(80, positions // 4),
                        max_gen_toks=min(48, positions // 4), render=render)
                    context.log.info(f"evaluating {model_asset}[{context.partition_key}] on {names + recipe.tasks}")
                    with phase("evaluate"):  # the harness: the heavy part of the step's trace
                        harness = run_lm_eval(model_dir, [*names, *recipe.tasks],
                                              [Path(tasks_dir), *map(Path, recipe.task_dirs)],
                                              batch_size=recipe.batch_size, limit=recipe.limit, seed=current.seed)
                    scored = perplexity_texts(Path(tasks_dir), recipe.limit)  # what lm-eval's bits_per_byte scored
                except TaskSetupError as exc:
                    raise dg.Failure(str(exc)) from None
            if hf_tokenizer is not None:
                encoder = _backend(hf_tokenizer, model_dir)
                train = [text for f in sorted((splits_dir / "train").glob("*.parquet"))
                         for text in pl.read_parquet(f, columns=["text"])["text"]]
                unigram = unigram_bits_per_byte(scored, encoder, text_log_probs(train, encoder))
            else:
                shards, tokenizer = project_tokens["token_shards"], project_tokens["tokenizer"]
                log_probs = shard_log_probs([store.local_dir(shards[key].sha256) for key in sorted(shards)])
                unigram = unigram_bits_per_byte(scored, stored_tokenizer(store, tokenizer), log_probs)
            safety, benign = (refusal_rate(model_dir, load_prompts(path), max_new_tokens=recipe.safety_max_new_tokens,
                                           batch_size=recipe.batch_size) for path in (RED_TEAM_FILE, BENIGN_FILE))
            report = EvalReport.from_harness(
                harness, safety=safety, benign=benign,
                extra={"kl_nats_per_sequence": float(kl.value)} if kl is not None else {},
                baselines={BITS_PER_BYTE: {"unigram": unigram}})
            (out / REPORT_JSON).write_text(report.to_json())
            (out / REPORT_MD).write_text(report.to_markdown())
            return report_metadata(report)

        # The change against the last promoted report is presentation, not part of the artifact
        # (read, and verified, before anything is built).
        promoted = promoted_report(store, context.partition_key)
        if own_tokenizer:
            # The model's tokenizer encodes the held-out documents and counts the training split.
            # The project's tokenizer and shards (parents for the sizes pretrained here) are not
            # read: recorded for the input-chain gate, out of the fingerprint, never verified.
            inputs = {"model": model, "dataset_splits": dataset_splits}
            narrowed, input_files = project_tokens, {name: () for name in project_tokens}
        else:
            # The held-out tasks are built from test.parquet alone; the unigram baseline counts the
            # shards' ids and encodes the documents with the tokenizer that packed them.
            inputs, narrowed = {"model": model, "dataset_splits": dataset_splits, **project_tokens}, None
            input_files = {"dataset_splits": ["test.parquet"], "token_shards": [TOKENS_FILE, META_FILE, INDEX_FILE],
                           "tokenizer": [TOKENIZER_FILE]}
        result = materialize_artifact(
            context, store, kind="eval_report", build=build, config={"recipe": recipe, "seed": current.seed},
            inputs=inputs, narrowed_inputs=narrowed, input_files=input_files)
        report = EvalReport.from_json(store.read_bytes(result.value.sha256, REPORT_JSON).decode())
        against = f"the current release's report {promoted[0][:12]}" if promoted else ""
        return dg.Output(result.value, data_version=result.data_version, metadata={
            **result.metadata, "compared_with": against or "no release yet",
            "figures": report.figures_table(),
            "report": dg.MetadataValue.md(report.to_markdown(promoted[1] if promoted else None, against)),
        })

    gate_names = eval_gate_names(manifest)
    eval_gates = gate_check(eval_report, name="eval_gates", gates=gate_names, read=report_reader(gate_names),
                            description="Every manifest gate named task.metric holds for the report's figure.")
    return eval_report, eval_gates
