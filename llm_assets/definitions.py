"""The Definitions: every part of the lifecycle, assembled."""

from __future__ import annotations

import dagster as dg
from dagster_aws.s3 import S3Resource

from llm_assets import data, tokenizer
from llm_assets.checks import build_hash_gates
from llm_assets.manifest import PipelineResource
from llm_assets.sensors import alert_sensor
from llm_assets.settings import Settings
from resources.alert_sinks import AlertSinksResource
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandleIOManager

ASSETS = [*data.assets, *tokenizer.assets]


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    s3 = S3Resource(endpoint_url=settings.s3_endpoint_url) if settings.store_uri.startswith("s3://") else None
    return {
        "artifact_store": ArtifactStoreResource(uri=settings.store_uri, s3=s3),
        "artifact_io": ArtifactHandleIOManager(),
        "pipeline": PipelineResource(manifest_path=settings.manifest),
        "alert_sinks": AlertSinksResource(
            jsonl_path=settings.alerts_jsonl, webhook_url=settings.alert_webhook_url
        ),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[*build_hash_gates(ASSETS), *data.checks, *tokenizer.checks],
        sensors=[*data.sensors, alert_sensor],
        resources=build_resources(settings or Settings.from_env()),
    )


defs = build_definitions()
