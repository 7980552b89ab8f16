"""The content-addressed artifact store: hashing, verification and the fingerprint index.

Objects are immutable and live at ``objects/<hash>/files/...`` beside
``objects/<hash>/MANIFEST.json`` (see :mod:`llm_assets.store.objects`) on a backend (see
:mod:`llm_assets.store.backends`).

The store also keeps an index, ``index/<asset>/<partition>/<fingerprint>.json``, mapping a
materialization's fingerprint to the artifact it produced: the basis of early cutoff.
``verified/<hash>.json`` holds what an object's files looked like when it last verified in full
(:meth:`ArtifactStore.verify_unless_unchanged`).

A remote (S3) object is read through a local cache (:mod:`llm_assets.store.cache`), checked
before each use: re-hashed with ``verify=True``, its file list and sizes otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from llm_assets.store.backends import LocalBackend, ProgressCallback, S3Backend, StoreBackend
from llm_assets.store.cache import LocalCache
from llm_assets.store.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStoreError,
    InvalidKeyError,
)
from llm_assets.store.fileio import remove_stale_children
from llm_assets.store.objects import (
    MANIFEST_NAME,
    ArtifactManifest,
    mismatch_problem,
    validate_hash,
    validate_relpath,
)

logger = logging.getLogger(__name__)

_KEY_PART_RE = re.compile(r"^[A-Za-z0-9._=+@%-]+$")


def index_key(asset: str, partition: str | None, fingerprint: str, namespace: str = "index") -> str:
    """The store-relative key of an index entry; asset is a '/'-joined asset key path."""
    parts = asset.split("/")
    for part in parts:
        if not part or part in (".", "..") or not _KEY_PART_RE.match(part):
            raise InvalidKeyError(f"asset key {asset!r} has an unsafe component {part!r}")
    partition_part = "_unpartitioned" if partition is None else "p=" + quote(partition, safe="")
    return "/".join([namespace, *parts, partition_part, validate_hash(fingerprint) + ".json"])


@dataclass(frozen=True)
class ArtifactRef:
    """A small typed handle to a stored object: what flows between steps instead of the data."""

    sha256: str
    uri: str
    bytes: int
    files: int


@dataclass(frozen=True)
class VerifyReport:
    artifact_hash: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class ArtifactStore:
    """Hashing, verification and the fingerprint index on top of a backend."""

    def __init__(self, backend: StoreBackend, cache_dir: str | Path | None = None):
        self.backend = backend
        # Where remote objects are read from locally: the one given, else the backend's own (S3);
        # a local backend reads in place and needs none.
        self.cache: LocalCache | None = LocalCache(Path(cache_dir)) if cache_dir else getattr(backend, "cache", None)

    @property
    def cache_dir(self) -> Path | None:
        return self.cache.root if self.cache is not None else None

    # -- writing ---------------------------------------------------------------------------
    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """A scratch directory to build an artifact in; ``put_dir(..., move=True)`` is then free."""
        return self.backend.staging_dir()

    def remove_stale_staging(self, max_age_seconds: float) -> list[str]:
        """Remove the staging folders of writers killed before they finished: every entry of the
        store's staging folders (``tmp/`` under a local store's root; for S3 the local cache's
        ``tmp/``, which holds its builds and downloads) whose newest mtime is older than
        ``max_age_seconds``. Returns the paths removed.

        A live writer touches its folder every
        :data:`~llm_assets.store.fileio.STAGING_HEARTBEAT_SECONDS` (30 s), so any age well above
        that (minutes) never removes a running build's folder; committed objects, the index and
        cached copies are never touched.
        """
        roots = []
        for root in (self.backend.staging_root(), self.cache.staging_root if self.cache is not None else None):
            if root is not None and root not in roots:
                roots.append(root)
        return [path for root in roots for path in remove_stale_children(root, max_age_seconds)]

    def put_dir(self, src: Path, *, move: bool = False, progress: ProgressCallback | None = None) -> ArtifactRef:
        """Store every file under ``src`` as one immutable object and return its handle."""
        src = Path(src)
        if not src.is_dir():
            raise ArtifactNotFoundError(f"cannot store {src}: not a directory")
        manifest = ArtifactManifest.of_directory(src)
        artifact_hash = manifest.sha256
        existing = self.backend.read_manifest_bytes(artifact_hash)
        replace = False
        if existing is not None:
            if self.verify(artifact_hash).ok:
                return self._ref(artifact_hash, manifest)
            replace = True  # a corrupted copy of the same content: write a fresh one over it
        self.backend.commit(manifest, src, move=move, replace=replace, progress=progress)
        return self._ref(artifact_hash, manifest)

    def _ref(self, artifact_hash: str, manifest: ArtifactManifest) -> ArtifactRef:
        return ArtifactRef(
            sha256=artifact_hash,
            uri=self.backend.object_uri(artifact_hash),
            bytes=manifest.total_bytes,
            files=len(manifest.files),
        )

    # -- reading ---------------------------------------------------------------------------
    def exists(self, artifact_hash: str) -> bool:
        return self.backend.read_manifest_bytes(validate_hash(artifact_hash)) is not None

    def manifest(self, artifact_hash: str) -> ArtifactManifest:
        data = self.backend.read_manifest_bytes(validate_hash(artifact_hash))
        if data is None:
            raise ArtifactNotFoundError(
                f"no artifact {artifact_hash} in {self.backend.object_uri(artifact_hash)}; "
                "rematerialize the asset that produces it"
            )
        manifest = ArtifactManifest.from_bytes(data, origin=f"manifest of {artifact_hash[:12]}")
        if manifest.sha256 != artifact_hash:
            raise ArtifactCorruptError(artifact_hash, [f"{MANIFEST_NAME}: content does not hash to the object name"])
        return manifest

    def ref(self, artifact_hash: str) -> ArtifactRef:
        return self._ref(artifact_hash, self.manifest(artifact_hash))

    def verify(self, artifact_hash: str) -> VerifyReport:
        """Re-hash every file of a stored object; each problem names the file."""
        try:
            manifest = self.manifest(artifact_hash)
        except ArtifactCorruptError as exc:
            return VerifyReport(artifact_hash, tuple(exc.problems))
        except ArtifactStoreError as exc:
            return VerifyReport(artifact_hash, (str(exc),))
        problems = []
        for entry in manifest.files:
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in self.backend.iter_file(artifact_hash, entry.path):
                    digest.update(chunk)
                    size += len(chunk)
            except FileNotFoundError:
                problems.append(f"{entry.path}: missing")
                continue
            if size != entry.bytes or digest.hexdigest() != entry.sha256:
                problems.append(mismatch_problem(entry.path, entry.sha256, entry.bytes, digest.hexdigest(), size))
        expected = {entry.path for entry in manifest.files}
        problems.extend(
            f"{path}: not in the manifest" for path in self.backend.list_object_files(artifact_hash)
            if path not in expected
        )
        return VerifyReport(artifact_hash, tuple(problems))

    def verify_unless_unchanged(self, artifact_hash: str) -> VerifyReport:
        """`verify`, answered without re-hashing where every file of the object (manifest
        included, no file added) is as it was when it last verified in full: the backend's file
        signatures then are kept under ``verified/<hash>.json``. For what a signature change
        proves on each backend, see its `file_signatures`; a backend that cannot vouch for a file
        now gets a full verify, and no record."""
        key = f"verified/{validate_hash(artifact_hash)}.json"
        before = self.backend.file_signatures(artifact_hash)
        recorded = self.backend.read_key(key)
        with contextlib.suppress(ValueError):  # a record that does not parse vouches for nothing
            if before is not None and recorded is not None and json.loads(recorded) == before:
                return VerifyReport(artifact_hash, ())
        report = self.verify(artifact_hash)
        # Signed before and after the hashing: a file changed meanwhile may not be what was hashed.
        if report.ok and before is not None and self.backend.file_signatures(artifact_hash) == before:
            self.backend.write_key(key, json.dumps(before, sort_keys=True).encode())
        return report

    def local_dir(self, artifact_hash: str, *, verify: bool = False) -> Path:
        """A local directory holding the object's files: in place for a local store, a cached copy
        for S3.

        With ``verify=True`` the stored object is verified (every file re-hashed, stray files
        reported) and so is the cached copy handed out; otherwise a cached copy's file list and
        sizes are checked, not its bytes (a download itself is always hashed as it streams). A
        cached copy that fails is removed and downloaded again; :class:`ArtifactCorruptError`
        names each file that differs, with the expected and actual sha256.
        """
        if verify:
            try:
                manifest = self.manifest(artifact_hash)
            except ArtifactCorruptError:
                raise
            except ArtifactStoreError as exc:  # missing, unreadable or malformed: not verifiable
                raise ArtifactCorruptError(str(artifact_hash), [str(exc)]) from exc
        else:
            manifest = self.manifest(artifact_hash)
        in_place = self.backend.local_files_dir(artifact_hash)
        if in_place is not None:
            if verify:
                self._require_ok(self.verify(artifact_hash))
            return in_place
        cache = self.cache
        if cache is None:
            raise ArtifactStoreError(f"store {self.backend.object_uri(artifact_hash)} has no local cache to read from")
        remote_verified = False
        if cache.has(artifact_hash):
            if verify:
                self._require_ok(self.verify(artifact_hash))  # the stored object first: the hash gate
                remote_verified = True
            problems = cache.problems(artifact_hash, manifest, full=verify)
            if not problems:
                return cache.path(artifact_hash)
            logger.warning(
                "the local copy %s of artifact %s does not match its manifest (%s); removing it and "
                "downloading the artifact again", cache.path(artifact_hash), artifact_hash, "; ".join(problems),
            )
            cache.evict(artifact_hash, problems)
        # Every downloaded file is hashed as it streams; checking for stray remote files as well
        # makes the download a full verification of the stored object.
        if not cache.fill(self.backend, artifact_hash, manifest, check_extras=verify and not remote_verified):
            problems = cache.problems(artifact_hash, manifest, full=verify)  # another process's copy
            if problems:
                raise ArtifactCorruptError(
                    artifact_hash, problems, where="the local copy", advice=cache.advice(artifact_hash)
                )
        return cache.path(artifact_hash)

    @staticmethod
    def _require_ok(report: VerifyReport) -> None:
        if not report.ok:
            raise ArtifactCorruptError(report.artifact_hash, list(report.problems))

    def read_bytes(self, artifact_hash: str, relpath: str) -> bytes:
        return b"".join(self.backend.iter_file(validate_hash(artifact_hash), validate_relpath(relpath)))

    # -- the fingerprint index ---------------------------------------------------------------
    def index_lookup(self, asset: str, partition: str | None, fingerprint: str) -> dict[str, Any] | None:
        data = self.backend.read_key(index_key(asset, partition, fingerprint))
        if data is None:
            return None
        try:
            entry = json.loads(data)
            validate_hash(entry["artifact"])
        except (ValueError, KeyError, TypeError):
            return None  # an unreadable entry is a cache miss, never a wrong hit
        return entry

    def index_record(
        self, asset: str, partition: str | None, fingerprint: str, artifact_hash: str,
        metadata: dict[str, Any],
    ) -> None:
        entry = {"artifact": validate_hash(artifact_hash), "metadata": metadata}
        self.backend.write_key(index_key(asset, partition, fingerprint), json.dumps(entry, sort_keys=True).encode())

    # -- progress of unfinished work (resumable training) --------------------------------------
    def progress_lookup(self, asset: str, partition: str | None, fingerprint: str) -> dict[str, Any] | None:
        """The last intermediate artifact (e.g. a checkpoint) of an unfinished materialization."""
        data = self.backend.read_key(index_key(asset, partition, fingerprint, namespace="progress"))
        try:
            entry = json.loads(data) if data is not None else None
            return entry if entry is not None and self.exists(entry["artifact"]) else None
        except (ValueError, KeyError, TypeError, InvalidKeyError):
            return None

    def progress_record(
        self, asset: str, partition: str | None, fingerprint: str, artifact_hash: str, step: int
    ) -> None:
        entry = {"artifact": validate_hash(artifact_hash), "step": step}
        self.backend.write_key(
            index_key(asset, partition, fingerprint, namespace="progress"), json.dumps(entry, sort_keys=True).encode()
        )


def open_store(uri: str, *, s3_client: Any = None, cache_dir: str | Path | None = None) -> ArtifactStore:
    """Open a store from a URI: a local path, ``file:///path`` or ``s3://bucket/prefix``.

    ``cache_dir`` is where an S3 store's objects are cached for local reading (used as it is);
    without one, a per-user folder (:func:`llm_assets.store.cache.default_s3_cache_dir`).
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if s3_client is None:
            raise ArtifactStoreError(f"store {uri} is on S3 but no S3 client was configured")
        if not parsed.netloc:
            raise ArtifactStoreError(f"store URI {uri!r} names no bucket; use s3://bucket/prefix")
        return ArtifactStore(S3Backend(s3_client, parsed.netloc, parsed.path, cache_dir))
    if parsed.scheme in ("file", ""):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        return ArtifactStore(LocalBackend(path), Path(cache_dir) if cache_dir else None)
    raise ArtifactStoreError(f"store URI {uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
