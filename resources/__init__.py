"""Dagster resources: the artifact store resource, the handle IO manager and the alert sinks.

The storage library itself is :mod:`llm_assets.store`."""

from resources.alert_sinks import AlertSinksResource
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, ArtifactHandleIOManager

__all__ = [
    "AlertSinksResource",
    "ArtifactHandle",
    "ArtifactHandleIOManager",
    "ArtifactStoreResource",
]
