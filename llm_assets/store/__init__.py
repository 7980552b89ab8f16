"""Content-addressed artifact store: the storage library under every asset.

An artifact is a directory of files. Its identity is the sha256 of its canonical manifest, a JSON
list of every file with its own sha256 and size. Objects are immutable and live at
``objects/<hash>/files/...`` beside ``objects/<hash>/MANIFEST.json``; a write commits by making
the manifest visible last.

Modules, bottom up:

- :mod:`~llm_assets.store.errors`: the exceptions;
- :mod:`~llm_assets.store.fileio`: sha256 of a file, fsync, atomic file replacement;
- :mod:`~llm_assets.store.objects`: the object manifest format and name validation;
- :mod:`~llm_assets.store.backends`: local directory and S3 backends;
- :mod:`~llm_assets.store.store`: ``ArtifactStore``, the fingerprint index, ``open_store``.

This package is the bottom layer: it imports neither Dagster nor the rest of ``llm_assets``
(the Dagster resource wrapping it is ``resources/artifact_store_resource.py``).
"""

from llm_assets.store.backends import LocalBackend, ProgressCallback, S3Backend, StoreBackend
from llm_assets.store.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStoreError,
    InvalidKeyError,
)
from llm_assets.store.fileio import fsync_path, hash_file, write_atomic
from llm_assets.store.objects import (
    MANIFEST_NAME,
    ArtifactManifest,
    FileEntry,
    validate_hash,
    validate_relpath,
)
from llm_assets.store.store import ArtifactRef, ArtifactStore, VerifyReport, index_key, open_store

__all__ = [
    "MANIFEST_NAME",
    "ArtifactCorruptError",
    "ArtifactManifest",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactStoreError",
    "FileEntry",
    "InvalidKeyError",
    "LocalBackend",
    "ProgressCallback",
    "S3Backend",
    "StoreBackend",
    "VerifyReport",
    "fsync_path",
    "hash_file",
    "index_key",
    "open_store",
    "validate_hash",
    "validate_relpath",
    "write_atomic",
]
