"""base_model: the manifest's base-model sizes imported into the artifact store.

Partitioned by those sizes only (a pretrained size has no base model). The fingerprint is the
source's signature (its files' content hashes, or its S3 objects' ETags), so re-importing an
unchanged model is a cache hit and a changed file imports again; the files are validated
(importer.py) before anything is committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from llm_assets.artifacts import artifact_asset, materialize_artifact
from llm_assets.base_model.importer import check_model_dir, open_source
from llm_assets.manifest import BaseModelSize, PipelineManifest
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource


def _s3_client(size: BaseModelSize) -> object | None:
    """The client of an s3:// base model, as the data sources get theirs (dagster-aws)."""
    if not size.base_model.startswith("s3://"):
        return None
    from dagster_aws.s3 import S3Resource

    return S3Resource(endpoint_url=size.endpoint_url or os.environ.get("LLM_ASSETS_S3_ENDPOINT_URL")).get_client()


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The import of every base-model size; nothing when the manifest names none."""
    if not manifest.base_model_sizes:
        return dg.Definitions()

    @artifact_asset(
        partitions_def=dg.StaticPartitionsDefinition(sorted(manifest.base_model_sizes)),
        code_version="1",
        kinds={"huggingface", "safetensors"},
        group_name="pretrain",  # beside pretraining: the other way a size gets its starting model
        description="A base model imported (safetensors, config, tokenizer, chat template, licence): the "
                    "starting model of a size that is not pretrained here.",
    )
    def base_model(
        context: dg.AssetExecutionContext,
        pipeline: PipelineResource,
        artifact_store: ArtifactStoreResource,
    ) -> dg.Output[ArtifactHandle]:
        size = pipeline.load().base_model_sizes[context.partition_key]
        # Listing the source refuses a missing path, an unreadable prefix or pickle-only weights
        # before the step builds anything.
        source = open_source(size.base_model, _s3_client(size))

        def build(out: Path) -> dict:
            source.fetch(out)
            return {"source": source.location, **check_model_dir(out, source.location)}

        return materialize_artifact(context, artifact_store.get_store(), kind="hf_model",
                                    config={"files": source.signature}, build=build)

    return dg.Definitions(assets=[base_model])
