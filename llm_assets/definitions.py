"""The Definitions: every part of the lifecycle, assembled.

The training stages are built from the manifest (its model sizes are their partitions), so the
Definitions load the manifest once, here.
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor

from llm_assets import data, tokenizer
from llm_assets.checks import build_hash_gates
from llm_assets.compute import data_step_configs
from llm_assets.evaluation.assets import build_evaluation_assets
from llm_assets.manifest import PipelineResource, load_manifest
from llm_assets.posttrain.assets import build_posttrain_assets
from llm_assets.pretrain.assets import build_pretrain_assets
from llm_assets.quantize.assets import build_quantize_assets
from llm_assets.release.assets import build_release_assets
from llm_assets.sensors import alert_sensor
from llm_assets.serving.assets import build_serving_assets
from llm_assets.settings import Settings, artifact_store_resource
from resources.alert_sinks import AlertSinksResource
from resources.handles import ArtifactHandleIOManager
from resources.quantize_environment import QuantizeEnvironmentResource


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "artifact_store": artifact_store_resource(settings),
        "artifact_io": ArtifactHandleIOManager(),
        "pipeline": PipelineResource(manifest_path=settings.manifest),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "quantize_environment": QuantizeEnvironmentResource(python=settings.quantize_python),
        "alert_sinks": AlertSinksResource(
            jsonl_path=settings.alerts_jsonl, webhook_url=settings.alert_webhook_url
        ),
    }


def k8s_executor(per_step: dict[str, dict]) -> dg.ExecutorDefinition:
    """dagster-k8s's step-per-pod executor with `per_step` pod configs added to whatever a run's
    config says (a run's own per-step entries win); every other executor setting stays the run's."""
    return k8s_job_executor.configured(
        lambda config: {**config, "per_step_k8s_config": {**per_step, **config.get("per_step_k8s_config", {})}},
        config_schema=k8s_job_executor.config_schema, name="k8s",
    )


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    manifest = load_manifest(settings.manifest)
    pretrain_assets, pretrain_checks = build_pretrain_assets(manifest)
    posttrain_assets, posttrain_checks = build_posttrain_assets(manifest)
    eval_assets, eval_checks = build_evaluation_assets(manifest)
    # The release reads the verdicts of every check of its lineage: it gets this graph (bound below).
    release_assets, release_checks = build_release_assets(manifest, lambda: defs.resolve_asset_graph())
    serving_assets, serving_checks = build_serving_assets(manifest)
    quantize_assets, quantize_checks = build_quantize_assets(manifest)
    assets = [*data.assets, *tokenizer.assets, *pretrain_assets, *posttrain_assets, *eval_assets, *release_assets,
              *serving_assets, *quantize_assets]
    defs = dg.Definitions(
        assets=assets,
        asset_checks=[*build_hash_gates(assets), *data.checks, *tokenizer.checks, *pretrain_checks,
                      *posttrain_checks, *eval_checks, *release_checks, *serving_checks, *quantize_checks],
        sensors=[*data.sensors, alert_sensor],
        resources=build_resources(settings),
        # On Kubernetes each step runs in its own pod, sized by its op tags (llm_assets.compute),
        # the data stages by the manifest's compute.data.
        executor=k8s_executor(data_step_configs(manifest.compute.data, assets)) if settings.executor == "k8s" else None,
    )
    return defs


defs = build_definitions()
