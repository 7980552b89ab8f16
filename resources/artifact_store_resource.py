"""The artifact store as a Dagster resource: one URI picks the backend."""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from llm_assets.store import ArtifactStore, open_store

# S3Resource fields that are secrets: a child process gets them as environment variables (which
# boto3 reads), never in a file it is handed.
_S3_SECRETS = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where every artifact lives.

    ``uri`` is a local directory (the embedded default) or ``s3://bucket/prefix``; for S3 the
    nested ``s3`` resource (dagster-aws) carries the endpoint URL and credentials, so any
    S3-compatible server works.
    """

    uri: str = Field(description="Local directory, file:// URI or s3://bucket/prefix")
    s3: S3Resource | None = Field(default=None, description="S3 client settings for s3:// stores")
    cache_dir: str | None = Field(
        default=None,
        description="Where objects from a remote store are cached for local reading (each copy checked "
        "before use); default: a per-user folder, $XDG_CACHE_HOME or ~/.cache, then llm-assets/<bucket>/<prefix>",
    )

    def get_store(self) -> ArtifactStore:
        client = self.s3.get_client() if self.s3 is not None else None
        return open_store(self.uri, s3_client=client, cache_dir=self.cache_dir)

    def for_child_process(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What a worker process (e.g. torchrun's ranks) needs to open this store itself:
        a JSON-able config for :func:`store_from_config`, and the environment holding the secrets."""
        s3 = self.s3.model_dump(exclude_none=True) if self.s3 is not None else None
        env = {name: s3.pop(field) for field, name in _S3_SECRETS.items() if s3 and field in s3}
        return {"uri": self.uri, "cache_dir": self.cache_dir, "s3": s3}, env


def store_from_config(config: dict[str, Any]) -> ArtifactStore:
    """The store described by :meth:`ArtifactStoreResource.for_child_process` (secrets from the environment)."""
    s3 = S3Resource(**config["s3"]) if config.get("s3") is not None else None
    return ArtifactStoreResource(uri=config["uri"], s3=s3, cache_dir=config.get("cache_dir")).get_store()
