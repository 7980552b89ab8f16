"""Dagster resources: the artifact store, the handle IO manager and the alert sinks."""

from resources.alert_sinks import AlertSinksResource
from resources.artifact_store import ArtifactStore, open_store
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, ArtifactHandleIOManager

__all__ = [
    "AlertSinksResource",
    "ArtifactHandle",
    "ArtifactHandleIOManager",
    "ArtifactStore",
    "ArtifactStoreResource",
    "open_store",
]
