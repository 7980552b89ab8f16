"""The pipeline manifest as a Dagster resource: what every asset reads its recipe from."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import dagster as dg
from pydantic import Field

from llm_assets.manifest import MANIFEST_ENV, ManifestError, PipelineManifest, load_manifest


@lru_cache(maxsize=8)
def _load_cached(path: str, sha256: str) -> PipelineManifest:
    return load_manifest(path)


class PipelineResource(dg.ConfigurableResource):
    """The manifest at `manifest_path`. When `manifest_sha256` is set (the Definitions record the
    hash of the manifest they were built from), a run refuses a manifest that changed since:
    the graph's partitions, stages and checks were built from the old one."""

    manifest_path: str = Field(description="Path of pipeline.yaml")
    manifest_sha256: str | None = Field(
        default=None, description="sha256 of the manifest the Definitions were built from; None: whatever is there")

    @classmethod
    def for_manifest(cls, path: str, manifest: PipelineManifest) -> PipelineResource:
        """The resource for a manifest just loaded from `path`, pinned to its content."""
        return cls(manifest_path=path, manifest_sha256=manifest.source_sha256)

    def load(self) -> PipelineManifest:
        path = os.path.abspath(self.manifest_path)
        try:
            with open(path, "rb") as f:
                sha256 = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest; set ${MANIFEST_ENV} or fix the resource config") from None
        if self.manifest_sha256 is not None and sha256 != self.manifest_sha256:
            raise ManifestError(
                f"{path} changed after the Definitions were built from it (sha256 {self.manifest_sha256[:12]} then, "
                f"{sha256[:12]} now): its model sizes, stages and gates may no longer match the graph. Reload the "
                "code location (the UI's Reload button, or restart `dagster dev`) and run again; the llm-assets "
                "commands read the manifest afresh each time.")
        return _load_cached(path, sha256)
