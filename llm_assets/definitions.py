"""The Definitions: every part of the lifecycle, assembled.

Each stage package builds its own `dg.Definitions` from the manifest (its model sizes are the
training stages' partitions), in lifecycle order; this module merges them and applies the
project-wide policy on top, the way one global policy is applied over every asset: the generated
hash gates, the alert sensor, the resources and the executor.
"""

from __future__ import annotations

import dagster as dg

from llm_assets.base_model import assets as base_model
from llm_assets.canary import assets as canary
from llm_assets.checks import build_hash_gates
from llm_assets.compute import data_step_configs
from llm_assets.data import assets as data
from llm_assets.evaluation import assets as evaluation
from llm_assets.evaluation import cai_gate
from llm_assets.launch import DrainingFileMessageReader
from llm_assets.manifest import PipelineManifest, load_manifest
from llm_assets.monitoring import assets as monitoring
from llm_assets.posttrain import assets as posttrain
from llm_assets.pretrain import assets as pretrain
from llm_assets.quantize import assets as quantize
from llm_assets.release import assets as release
from llm_assets.retrain import assets as retrain
from llm_assets.sensors import alert_sensor
from llm_assets.serving import assets as serving
from llm_assets.settings import Settings, artifact_store_resource
from llm_assets.tokenizer import assets as tokenizer
from resources.alert_sinks import AlertSinksResource
from resources.handles import ArtifactHandleIOManager
from resources.pipeline import PipelineResource
from resources.quantize_environment import QuantizeEnvironmentResource
from resources.tracking import TrackingResource


def build_resources(settings: Settings, manifest: PipelineManifest | None = None) -> dict[str, object]:
    """The resources every asset may ask for; the pipeline resource is pinned to `manifest` (the
    one the graph was built from: a run refuses a manifest that changed since) when given."""
    return {
        "artifact_store": artifact_store_resource(settings),
        "artifact_io": ArtifactHandleIOManager(),
        "pipeline": PipelineResource.for_manifest(settings.manifest, manifest) if manifest is not None
        else PipelineResource(manifest_path=settings.manifest),
        "pipes_subprocess_client": dg.PipesSubprocessClient(message_reader=DrainingFileMessageReader()),
        "quantize_environment": QuantizeEnvironmentResource(python=settings.quantize_python),
        "alert_sinks": AlertSinksResource(
            jsonl_path=settings.alerts_jsonl, webhook_url=settings.alert_webhook_url
        ),
        # MLflow runs of the tracked stages; its URI and experiment come from the environment at run time.
        "tracking": TrackingResource(),
    }


def k8s_executor(per_step: dict[str, dict]) -> dg.ExecutorDefinition:
    """dagster-k8s's step-per-pod executor with `per_step` pod configs added to whatever a run's
    config says (a run's own per-step entries win); every other executor setting stays the run's."""
    # Imported here: dagster-k8s pulls in the Kubernetes client, seconds of every load that runs in-process.
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(
        lambda config: {**config, "per_step_k8s_config": {**per_step, **config.get("per_step_k8s_config", {})}},
        config_schema=k8s_job_executor.config_schema, name="k8s",
    )


def with_hash_gates(defs: dg.Definitions) -> dg.Definitions:
    """`defs` with an integrity and an input-chain gate generated for each of its assets."""
    return dg.Definitions.merge(defs, dg.Definitions(asset_checks=build_hash_gates(defs.assets or [])))


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    manifest = load_manifest(settings.manifest)
    lineage = with_hash_gates(dg.Definitions.merge(
        *(stage.build_defs(manifest)
          for stage in (data, tokenizer, base_model, pretrain, posttrain, evaluation, cai_gate, quantize)),
        dg.Definitions(resources=build_resources(settings, manifest)),
    ))
    # The release reads back the verdict of every check of its lineage: it gets that graph.
    released = with_hash_gates(dg.Definitions.merge(
        release.build_defs(manifest, lineage.resolve_asset_graph()), serving.build_defs(manifest),
        canary.build_defs(manifest),
        monitoring.build_defs(manifest), retrain.build_defs(manifest)))
    # The loop's release reads back the checks of its own lineage: the loop and everything below.
    loop = dg.Definitions.merge(lineage, released)
    stages = dg.Definitions.merge(
        loop, with_hash_gates(retrain.build_release_defs(manifest, loop.resolve_asset_graph())))
    return dg.Definitions.merge(stages, dg.Definitions(
        sensors=[alert_sensor],
        # On Kubernetes each step runs in its own pod, sized by its op tags (llm_assets.compute),
        # the data stages by the manifest's compute.data.
        executor=k8s_executor(data_step_configs(manifest.compute.data, stages.assets or []))
        if settings.executor == "k8s" else None,
    ))


defs = build_definitions()
