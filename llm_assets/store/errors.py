"""The errors the artifact store raises, every one a subclass of :class:`ArtifactStoreError`."""

from __future__ import annotations


class ArtifactStoreError(Exception):
    """Base class of every error the store raises."""


class InvalidKeyError(ArtifactStoreError, ValueError):
    """A file path, asset key or hash that could escape the store or is malformed."""


class ArtifactNotFoundError(ArtifactStoreError, FileNotFoundError):
    """No committed object has this hash."""


class ArtifactCorruptError(ArtifactStoreError):
    """A stored object (or a local copy of it) no longer matches its manifest.

    ``problems`` are one line per file, each starting with the file's path and a colon.
    """

    def __init__(
        self, artifact_hash: str, problems: list[str], *, where: str | None = None, advice: str | None = None
    ):
        self.artifact_hash = artifact_hash
        self.problems = problems
        subject = f"artifact {artifact_hash}" if where is None else f"{where} of artifact {artifact_hash}"
        super().__init__(
            f"{subject} is corrupt: " + "; ".join(problems)
            + ". " + (advice or "Rematerialize the asset that produced it to write a fresh copy.")
        )
