"""The artifact store as a Dagster resource: one URI picks the backend."""

from __future__ import annotations

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from resources.artifact_store import ArtifactStore, open_store


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where every artifact lives.

    ``uri`` is a local directory (the embedded default) or ``s3://bucket/prefix``; for S3 the
    nested ``s3`` resource (dagster-aws) carries the endpoint URL and credentials, so any
    S3-compatible server works.
    """

    uri: str = Field(description="Local directory, file:// URI or s3://bucket/prefix")
    s3: S3Resource | None = Field(default=None, description="S3 client settings for s3:// stores")
    cache_dir: str | None = Field(
        default=None, description="Where objects from a remote store are cached for local reading"
    )

    def get_store(self) -> ArtifactStore:
        client = self.s3.get_client() if self.s3 is not None else None
        return open_store(self.uri, s3_client=client, cache_dir=self.cache_dir)
