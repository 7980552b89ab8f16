"""The errors the artifact store raises, every one a subclass of :class:`ArtifactStoreError`."""

from __future__ import annotations


class ArtifactStoreError(Exception):
    """Base class of every error the store raises."""


class InvalidKeyError(ArtifactStoreError, ValueError):
    """A file path, asset key or hash that could escape the store or is malformed."""


class ArtifactNotFoundError(ArtifactStoreError, FileNotFoundError):
    """No committed object has this hash."""


class ArtifactCorruptError(ArtifactStoreError):
    """A stored object no longer matches its manifest."""

    def __init__(self, artifact_hash: str, problems: list[str]):
        self.artifact_hash = artifact_hash
        self.problems = problems
        super().__init__(
            f"artifact {artifact_hash[:12]} is corrupt: " + "; ".join(problems)
            + ". Rematerialize the asset that produced it to write a fresh copy."
        )
