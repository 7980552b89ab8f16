"""The constitutional-AI gate: a policy trained on cai_dataset pairs refuses the held-out red-team
prompts at least as often as the same policy trained without them.

`policy_without_cai[size]` is that counterfactual: the policy stage's recipe and seed, trained on
preference_dataset alone (llm_assets/posttrain/policy.py, no checkpoints: it is cheap beside the
policy and is rebuilt whole). Both policies answer the red-team prompts that CAI never saw
(`posttrain.cai.split_red_team`), greedily, and `safety.refusal_rate` counts the refusals; the gate
`cai_refusal_rate_gate` judges the CAI policy's rate against `gates.cai_refusal_rate` with the
rate without CAI as its `without_cai` baseline (default: `{baseline: without_cai, min_delta: 0}`).
It sits in the evaluation layer because the refusal measure does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import dagster as dg

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.checks.gate_check import gate_check
from llm_assets.compute import k8s_op_tags
from llm_assets.evaluation.safety import RED_TEAM_FILE, SafetyResult, load_prompts, refusal_rate
from llm_assets.manifest import CAI_GATE, ConstitutionRecipe, PipelineManifest
from llm_assets.posttrain.assets import metric_reader
from llm_assets.posttrain.dataset_files import read_dataset
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

WITH, WITHOUT = "cai_refusal_rate", "refusal_rate_without_cai"


def held_out_red_team(recipe: ConstitutionRecipe, seed: int) -> list[str]:
    """The shipped red-team prompts CAI does not answer: the gate's prompts."""
    from llm_assets.posttrain.cai import split_red_team  # cai's module loads torch: imported when judged

    return split_red_team(load_prompts(RED_TEAM_FILE), recipe.held_out_fraction, seed)[1]


def compare_refusals(with_cai: Path, without_cai: Path, prompts: list[str],
                     recipe: ConstitutionRecipe) -> tuple[SafetyResult, SafetyResult]:
    """The refusal rates of the two policies on the same prompts, measured the same way."""
    return tuple(refusal_rate(model, prompts, max_new_tokens=recipe.safety_max_new_tokens,
                              batch_size=recipe.batch_size, examples=3) for model in (with_cai, without_cai))


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The counterfactual policy and its gate, when the policy trains on cai_dataset."""
    policy_recipe = manifest.stages.policy
    if policy_recipe is None or "cai_dataset" not in policy_recipe.preferences:
        return dg.Definitions()

    @artifact_asset(partitions_def=dg.StaticPartitionsDefinition(sorted(manifest.model_sizes)), code_version="1",
                    kinds={"trl", "huggingface"}, group_name="evaluation",
                    op_tags=k8s_op_tags(manifest.compute.training),
                    description="The policy's recipe trained on preference_dataset alone (no CAI pairs), and the "
                                "refusal rates of both policies on the held-out red-team prompts.")
    def policy_without_cai(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                           artifact_store: ArtifactStoreResource, policy: ArtifactHandle, sft_model: ArtifactHandle,
                           preference_dataset: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, current = artifact_store.get_store(), pipeline.load()
        recipe = current.stages.policy.model_copy(update={"checkpoint_every": 0})
        constitution = current.stages.constitution
        prompts = held_out_red_team(constitution, current.seed)

        def build(out: Path) -> dict:
            from llm_assets.posttrain.policy import run_policy  # the trainers load with the step

            pairs_train, pairs_val = read_dataset(store.local_dir(preference_dataset.sha256))
            with tempfile.TemporaryDirectory(prefix="llm-assets-trl-") as work:
                run_policy(store.local_dir(sft_model.sha256), None, pairs_train, pairs_val, recipe, out, Path(work),
                           seed=current.seed)
            with_cai, without = compare_refusals(store.local_dir(policy.sha256), out, prompts, constitution)
            examples = [{"prompt": e.prompt, "with_cai": e.completion, "without_cai": w.completion}
                        for e, w in zip(with_cai.examples, without.examples, strict=True)]
            return {WITH: round(with_cai.rate, 4), WITHOUT: round(without.rate, 4), "held_out_prompts": len(prompts),
                    "policy_sha256": policy.sha256, "examples": dg.MetadataValue.json(examples)}

        # The CAI policy is an input for its answers: a retrained policy is measured afresh.
        return materialize_artifact(
            context, store, kind="hf_model",
            config={"recipe": recipe, "constitution": constitution, "seed": current.seed},
            inputs={"sft_model": sft_model, "preference_dataset": preference_dataset, "policy": policy}, build=build)

    gate = gate_check(
        policy_without_cai, name=f"{CAI_GATE}_gate", gates=[CAI_GATE],
        read=metric_reader(CAI_GATE, WITH, {"without_cai": WITHOUT}),
        description=f"The refusal rate on held-out red-team prompts of the policy trained with cai_dataset pairs "
                    f"within gates.{CAI_GATE}, against the same policy trained without them (without_cai).")
    return dg.Definitions(assets=[policy_without_cai], asset_checks=[gate])
