"""Money for every stage: estimates priced on GPUs or CPUs, the cost gate every training,
evaluation and quantization step passes before it builds, and the cost every step records."""

import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.cli import EXIT_OK, EXIT_OVER_BUDGET, main
from llm_assets.cost_gate import Spent, over_budget, spent_usd
from llm_assets.costs import ESTIMATED_ASSETS, actual_usd, stage_estimate, step_estimate
from llm_assets.definitions import build_definitions
from llm_assets.manifest import PipelineManifest, load_manifest
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.conftest import SAFETY_GATES
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, ArtifactHandleIOManager, handle_metadata
from resources.pipeline import PipelineResource
from resources.tracking import TrackingResource

XS = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "vocab_size": 320,
      "max_seq_len": 64}
SFT = dg.AssetKey("sft_model")


def with_sft(manifest_path: Path, **budget) -> PipelineManifest:
    """Pretraining and SFT of one tiny size, priced by ``budget`` (CPU figures small enough that
    the tiny SFT step costs dollars)."""
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"].update(
        tokenizer={"vocab_size": 320, "sample_mb": 0.3},
        pretrain={"steps": 40, "batch_size": 4, "seq_len": 32, "learning_rate": 0.01},
        sft={"steps": 12, "batch_size": 4, "learning_rate": 0.01, "max_length": 64},
    )
    manifest["model_sizes"] = {"xs": XS}
    manifest["gates"] = {"pretrain_val_loss": {"max": 7.0}, "sft_val_loss": {"max": 8.0}}
    manifest["budget"].update(budget)
    manifest_path.write_text(yaml.safe_dump(manifest))
    return load_manifest(manifest_path)


def report(instance: dg.DagsterInstance, asset: str, partition: str | None, cost_usd: float | None,
           sha256: str = "0" * 64) -> None:
    """A materialization in the instance's event log, as a step records it."""
    handle = ArtifactHandle(asset=asset, partition=partition, kind="test", sha256=sha256, uri=f"/nowhere/{sha256}",
                            bytes=1)
    cost = {} if cost_usd is None else {"cost_usd": cost_usd}
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=asset, partition=partition, metadata={**handle_metadata(handle), **cost}))


def step_failures(instance: dg.DagsterInstance) -> list[str]:
    return [e.dagster_event.event_specific_data.error.message for run in instance.get_runs() if run.is_failure
            for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_step_failure]


def test_sft_over_the_cap_refuses_before_training_naming_the_figures(settings, manifest_path, instance):
    # 1,000 FLOP/s per CPU core: the 566 MFLOPs of this SFT step take 157 CPU-hours, $7.86.
    manifest = with_sft(manifest_path, usd_cap=5.0, cpu_flops_per_core=1e3, usd_per_cpu_hour=0.05)
    estimate = stage_estimate(manifest, "sft", "xs", "cpu")
    assert estimate.flops == 6 * 30_720 * 12 * 4 * 64 and estimate.usd == pytest.approx(7.864, abs=1e-3)
    # SFT's parents are in the instance (their artifacts are not in the store: the step must stop
    # before it reads them), and the pretraining cost $1.25.
    report(instance, "pretrain_checkpoint", "xs", 1.25, "1" * 64)
    report(instance, "sft_dataset", None, 0.0, "2" * 64)
    result = materialize_graph(build_definitions(settings), instance, selection="key:sft_model", log=lambda _: None)

    assert not result.success
    [message] = step_failures(instance)
    assert ("refused: training sft_model[xs] is estimated at $7.86 (6·N·D = 6 × 30,720 parameters × 3,072 tokens "
            "= 5.66e+08 FLOPs; 157.3 CPU-hours at 1e+03 FLOP/s per CPU core, $0.05/CPU-hour)") in message
    assert "$1.25 is already spent by the current materializations of 2 other asset partition(s)" in message
    assert "$9.11 in all, over budget.usd_cap $5.00 by $4.11. Nothing was built." in message
    assert (f"Shrink stages.sft.{{steps, batch_size or grad_accum}} or the model sizes, or raise budget.usd_cap, in "
            f"{manifest_path}") in message
    # Refused before anything was read (a missing input would have failed it otherwise) or trained.
    assert instance.get_latest_materialization_event(SFT) is None
    assert not (Path(settings.store_uri) / "progress").exists()


def _test_assets(manifest: PipelineManifest, built: list[str]) -> list[dg.AssetsDefinition]:
    """A data step and a training step named like the SFT stage, which build a small file."""
    sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))

    def build_into(label: str, content: str):
        def build(out: Path) -> dict:
            built.append(label)
            (out / "data.txt").write_text(f"{content} {sum(i * i for i in range(200_000))}")  # some CPU time
            return {}
        return build

    @artifact_asset(group_name="data")
    def corpus_text(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                    artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        seed = pipeline.load().seed
        return materialize_artifact(context, artifact_store.get_store(), kind="text", config=seed,
                                    build=build_into("corpus_text", f"seed {seed}"))

    @artifact_asset(name="sft_model", group_name="posttrain", partitions_def=sizes)
    def sft_model(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                  artifact_store: ArtifactStoreResource, corpus_text: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model", config={"seed": 1},
                                    inputs={"corpus_text": corpus_text},
                                    build=build_into(context.partition_key, "weights"))

    return [corpus_text, sft_model]


def test_every_step_records_its_cost_and_a_cache_hit_or_data_step_is_never_refused(tmp_path, manifest_path,
                                                                                   instance):
    manifest = with_sft(manifest_path, usd_cap=10.0, cpu_flops_per_core=1e3, usd_per_cpu_hour=0.05)
    built: list[str] = []
    assets = _test_assets(manifest, built)
    resources = {"pipeline": PipelineResource(manifest_path=str(manifest_path)),
                 "artifact_io": ArtifactHandleIOManager(),
                 "artifact_store": ArtifactStoreResource(uri=str(tmp_path / "store")),
                 "tracking": TrackingResource(enabled=False)}

    def run(selection: str, partition: str | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(assets, selection=selection, partition_key=partition, resources=resources,
                              instance=instance, raise_on_error=False)

    def current(key: str, partition: str | None = None) -> dict:
        return {k: v.value for k, v in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
            limit=1).records[0].asset_materialization.metadata.items()}

    assert run("corpus_text").success
    data = current("corpus_text")
    # A data step: no estimate, billed the CPU time it used.
    assert data["cost_usd"] > 0 and "estimated_cost_usd" not in data
    assert data["cost_usd"] <= data["wall_seconds"] * os.cpu_count() / 3600 * 0.05

    assert run("sft_model", "xs").success
    sft = current("sft_model", "xs")
    assert sft["estimated_cost_usd"] == pytest.approx(7.864, abs=1e-3) and "157.3 CPU-hours" in sft["cost_estimate"]
    assert 0 < sft["cost_usd"] < 0.001 and built == ["corpus_text", "xs"]

    # The cap falls under the SFT estimate: a cache hit of the same step reuses its artifact, is not
    # refused, and reports what the artifact cost; a data step that builds anew is not refused either.
    yaml_manifest = yaml.safe_load(manifest_path.read_text())
    yaml_manifest["budget"]["usd_cap"] = 1.0
    yaml_manifest["seed"] = 8  # a new corpus_text config: a cache miss
    manifest_path.write_text(yaml.safe_dump(yaml_manifest))
    assert run("sft_model", "xs").success
    hit = current("sft_model", "xs")
    assert hit["cache_hit"] is True and hit["cost_usd"] == sft["cost_usd"] and built == ["corpus_text", "xs"]
    assert run("corpus_text").success and built == ["corpus_text", "xs", "corpus_text"]

    # ...but the step itself, built anew (its input changed), is refused before its build runs.
    result = run("sft_model", "xs")
    assert not result.success and built == ["corpus_text", "xs", "corpus_text"]
    assert "refused: training sft_model[xs] is estimated at $7.86" in step_failures(instance)[-1]


def test_what_is_spent_sums_the_current_cost_of_every_other_asset_partition(instance):
    report(instance, "pretrain_checkpoint", "xs", 0.50)
    report(instance, "pretrain_checkpoint", "xs", 0.30)  # rebuilt: its current cost replaces the first
    report(instance, "pretrain_checkpoint", "s", 0.70)
    report(instance, "eval_report", "xs", 0.25)
    report(instance, "corpus_text", None, 0.01)
    report(instance, "sft_model", "xs", 4.00)  # the step being built: its old artifact is being replaced
    report(instance, "tokenizer", None, None)  # built before costs were recorded
    spent = spent_usd(instance, SFT, "xs")
    assert spent == Spent(pytest.approx(1.26), 4)
    assert spent_usd(instance, SFT, "s").usd == pytest.approx(5.26)


def with_every_priced_stage(manifest_path: Path, **budget) -> PipelineManifest:
    with_sft(manifest_path, **budget)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["stages"].update(
        reward={"steps": 4, "learning_rate": 0.01, "max_length": 64},
        policy={"steps": 4, "learning_rate": 0.001, "max_length": 64},
        evaluation={"max_docs": 10},
        quantize={"calibration_texts": 8, "heldout_texts": 4, "max_tokens": 128, "group_size": 16},
        serving={"smoke_prompts": ["def parse(text):"]},
        monitoring={"fine_tune": {"sft": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "max_length": 64},
                                  "dpo": {"algorithm": "dpo", "steps": 2, "batch_size": 2, "learning_rate": 1e-4,
                                          "max_length": 64}}})
    manifest["gates"].update(reward_accuracy={"min": 0.5}, policy_kl={"max": 20.0},
                             quantized_perplexity_increase={"max": 0.1}, **SAFETY_GATES,
                             **{"drift.js_divergence": {"max": 0.3}})
    manifest_path.write_text(yaml.safe_dump(manifest))
    return load_manifest(manifest_path)


def test_every_step_that_asks_for_gpus_has_an_estimate(settings, manifest_path):
    """The gate finds a step's estimate by its asset's name: a renamed stage must not slip past it."""
    with_every_priced_stage(manifest_path)
    graph = build_definitions(settings).resolve_asset_graph()
    on_gpus = {key.to_user_string() for key in graph.materializable_asset_keys
               if graph.get(key).tags.get("compute") == "gpu"}
    assert on_gpus == set(ESTIMATED_ASSETS)


def test_plan_prices_every_step_on_gpus_and_cpus_and_holds_the_cap_where_they_run(manifest_path, capsys):
    with_every_priced_stage(manifest_path, usd_cap=1.0, cpu_flops_per_core=1e4)
    assert main(["--manifest", str(manifest_path), "plan"]) == EXIT_OK
    out = capsys.readouterr().out
    for row in ("sft        xs", "reward     xs", "policy     xs", "evaluation xs", "quantize   xs|gptq-4bit",
                "quantize   xs|int8"):
        assert row in out
    assert "CPU-hours at 10.00kFLOP/s per core, $0.05/CPU-hour" in out and "CPU USD" in out
    assert "the training steps run on GPUs (compute.training.gpus: 1)" in out

    # The same steps on CPU pods: at 10,000 FLOP/s per core they cost more than the cap.
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["compute"] = {"training": {"gpus": 0}}
    manifest_path.write_text(yaml.safe_dump(manifest))
    assert main(["--manifest", str(manifest_path), "plan"]) == EXIT_OVER_BUDGET
    captured = capsys.readouterr()
    assert "the training steps run on CPUs (compute.training.gpus: 0)" in captured.out
    assert "refused: the estimate exceeds budget.usd_cap" in captured.err


def test_estimates_cover_evaluation_quantization_and_price_gpus(manifest_path):
    manifest = with_every_priced_stage(manifest_path)
    n = 30_720
    evaluation = step_estimate(manifest, "eval_report", "xs", "gpu")
    assert evaluation.flops == 2 * n * (3 * 10 * 4 * 64) and evaluation.device == "gpu"
    assert evaluation.usd == pytest.approx(evaluation.flops / (1e15 * 0.4) / 3600 * 2.0)
    # Both orders of a two-dimensional partition; GPTQ calibrates, int8 does not; positions cap tokens.
    assert step_estimate(manifest, "quantized_model", "xs|gptq-4bit", "cpu").tokens == (8 + 2 * 4) * 64
    assert step_estimate(manifest, "quantized_model", "int8|xs", "cpu").tokens == 2 * 4 * 64
    assert step_estimate(manifest, "corpus_text", None, "cpu") is None
    with pytest.raises(ValueError, match=r"quantized_model\[int8\|xl\]: the partition names no model size"):
        step_estimate(manifest, "quantized_model", "int8|xl", "cpu")
    assert over_budget("eval_report[xs]", "evaluation", evaluation, Spent(0.0, 0), manifest.budget, "m.yaml") is None
    refusal = over_budget("eval_report[xs]", "evaluation", evaluation, Spent(1.0, 3), manifest.budget, "m.yaml")
    assert refusal.startswith("refused: evaluating eval_report[xs] is estimated at $")
    assert "Shrink stages.evaluation.{max_docs, limit or tasks}" in refusal
    # The loop's fine-tune: its SFT and DPO tokens together; its evaluation is eval_report's.
    fine_tune = step_estimate(manifest, "feedback_model", "xs", "gpu")
    assert fine_tune.tokens == 3 * 2 * 64 + 2 * 2 * 64 * 2 and fine_tune.flops == 6 * n * fine_tune.tokens
    assert step_estimate(manifest, "feedback_eval_report", "xs", "gpu") == evaluation
    refusal = over_budget("feedback_model[xs]", "monitoring.fine_tune", fine_tune, Spent(1.0, 3), manifest.budget,
                          "m.yaml")
    assert refusal.startswith("refused: fine-tuning feedback_model[xs] is estimated at $")
    assert "Shrink stages.monitoring.fine_tune.{sft,dpo}.{steps, batch_size or grad_accum}" in refusal
    # Held GPUs are billed by the hour, whatever the CPUs did; CPU steps by the CPU time used.
    assert actual_usd(1800, 2, 5000, manifest.budget) == 2.0
    assert actual_usd(1800, 0, 7200, manifest.budget) == 0.1


def test_an_artifact_asset_without_the_pipeline_resource_is_told_to_take_it(tmp_path, instance):
    @artifact_asset(group_name="data")
    def unpriced(context: dg.AssetExecutionContext, artifact_store: ArtifactStoreResource) -> dg.Output[ArtifactHandle]:
        return materialize_artifact(context, open_store(str(tmp_path / "store")), kind="text",
                                    build=lambda out: (out / "a.txt").write_text("a") and None)

    result = dg.materialize([unpriced], instance=instance, raise_on_error=False, resources={
        "artifact_io": ArtifactHandleIOManager(), "artifact_store": ArtifactStoreResource(uri=str(tmp_path / "store")),
        "tracking": TrackingResource(enabled=False)})
    assert not result.success
    assert "add `pipeline: PipelineResource` to the asset's parameters" in step_failures(instance)[0]
