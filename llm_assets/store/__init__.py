"""Content-addressed artifact store: the storage library under every asset.

An artifact is a directory of files. Its identity is the sha256 of its canonical manifest, a JSON
list of every file with its own sha256 and size. Objects are immutable and live at
``objects/<hash>/files/...`` beside ``objects/<hash>/MANIFEST.json``; a write commits by making
the manifest visible last.

Modules, bottom up:

- :mod:`~llm_assets.store.errors`: the exceptions;
- :mod:`~llm_assets.store.fileio`: sha256 of a file, fsync, atomic file replacement, staging
  folders kept fresh by their writer and swept once stale;
- :mod:`~llm_assets.store.objects`: the object manifest format and name (path, key, hash) validation;
- :mod:`~llm_assets.store.cache`: the verified local copy of remote objects and where it lives;
- :mod:`~llm_assets.store.backends`: local directory and S3 backends;
- :mod:`~llm_assets.store.store`: ``ArtifactStore``, the fingerprint index, ``open_store``.

This package is the bottom layer: it imports neither Dagster nor the rest of ``llm_assets``
(the Dagster resource wrapping it is ``resources/artifact_store_resource.py``).
"""

from llm_assets.store.backends import LocalBackend, ProgressCallback, S3Backend, StoreBackend
from llm_assets.store.cache import CACHE_DIR_ENV, LocalCache, default_s3_cache_dir
from llm_assets.store.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStoreError,
    InvalidKeyError,
)
from llm_assets.store.fileio import STAGING_HEARTBEAT_SECONDS, fsync_path, hash_file, write_atomic
from llm_assets.store.objects import (
    MANIFEST_NAME,
    ArtifactManifest,
    FileEntry,
    validate_hash,
    validate_key,
    validate_relpath,
)
from llm_assets.store.store import ArtifactRef, ArtifactStore, VerifyReport, index_key, open_store

__all__ = [
    "CACHE_DIR_ENV",
    "MANIFEST_NAME",
    "STAGING_HEARTBEAT_SECONDS",
    "ArtifactCorruptError",
    "ArtifactManifest",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactStoreError",
    "FileEntry",
    "InvalidKeyError",
    "LocalBackend",
    "LocalCache",
    "ProgressCallback",
    "S3Backend",
    "StoreBackend",
    "VerifyReport",
    "default_s3_cache_dir",
    "fsync_path",
    "hash_file",
    "index_key",
    "open_store",
    "validate_hash",
    "validate_key",
    "validate_relpath",
    "write_atomic",
]
