"""Content-addressed artifact store.

An artifact is a directory of files. Its identity is the sha256 of its canonical manifest, a JSON
list of every file with its own sha256 and size. Objects are immutable and live at
``objects/<hash>/files/...`` beside ``objects/<hash>/MANIFEST.json``.

A write commits by making the manifest visible last, so a reader that finds a manifest finds every
file it names:

- local directory: files go to a private staging directory, are fsynced, then the whole directory
  is renamed into ``objects/`` in one atomic step;
- S3: files are uploaded under the object's prefix, then the manifest.

A writer killed halfway leaves only staging debris (``tmp/`` locally, manifest-less files on S3)
that no reader ever treats as an object.

The store also keeps an index, ``index/<asset>/<partition>/<fingerprint>.json``, mapping a
materialization's fingerprint to the artifact it produced: the basis of early cutoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote, urlparse

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_PART_RE = re.compile(r"^[A-Za-z0-9._=+@%-]+$")

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(relpath, bytes_done, bytes_total)`` after each file is written."""


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


def validate_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an artifact, else raise."""
    if not isinstance(path, str) or not path:
        raise InvalidKeyError("artifact file path is empty")
    if "\\" in path or "\x00" in path:
        raise InvalidKeyError(f"artifact file path {path!r} contains a backslash or NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise InvalidKeyError(f"artifact file path {path!r} is absolute; use a relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidKeyError(
            f"artifact file path {path!r} has an empty, '.' or '..' component (path traversal)"
        )
    return path


def validate_hash(artifact_hash: str) -> str:
    if not isinstance(artifact_hash, str) or not _HASH_RE.match(artifact_hash):
        raise InvalidKeyError(f"{artifact_hash!r} is not a sha256 hex digest")
    return artifact_hash


def index_key(asset: str, partition: str | None, fingerprint: str, namespace: str = "index") -> str:
    """The store-relative key of an index entry; asset is a '/'-joined asset key path."""
    parts = asset.split("/")
    for part in parts:
        if not part or part in (".", "..") or not _KEY_PART_RE.match(part):
            raise InvalidKeyError(f"asset key {asset!r} has an unsafe component {part!r}")
    partition_part = "_unpartitioned" if partition is None else "p=" + quote(partition, safe="")
    return "/".join([namespace, *parts, partition_part, validate_hash(fingerprint) + ".json"])


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ArtifactManifest:
    files: tuple[FileEntry, ...]

    def canonical_bytes(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "manifest") -> ArtifactManifest:
        try:
            body = json.loads(data)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {body.get('format')!r}")
            files = tuple(
                FileEntry(validate_relpath(f["path"]), validate_hash(f["sha256"]), int(f["bytes"]))
                for f in body["files"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactStoreError(f"{origin} is not a valid artifact manifest: {exc}") from exc
        return cls(files=tuple(sorted(files, key=lambda f: f.path)))

    @classmethod
    def of_directory(cls, root: Path) -> ArtifactManifest:
        """Hash every regular file under ``root``; refuses symlinks and special files."""
        entries = []
        for path in sorted(_walk_files(root)):
            rel = path.relative_to(root).as_posix()
            entries.append(FileEntry(validate_relpath(rel), *_hash_file(path)))
        return cls(files=tuple(entries))


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


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise InvalidKeyError(f"{path} is a symbolic link; artifacts hold regular files only")
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                raise InvalidKeyError(f"{path} is not a regular file")
            yield path


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreBackend(Protocol):
    """Raw object storage under one root; knows nothing about hashing."""

    def object_uri(self, artifact_hash: str) -> str: ...
    def read_manifest_bytes(self, artifact_hash: str) -> bytes | None: ...
    def list_object_files(self, artifact_hash: str) -> list[str]: ...
    def iter_file(self, artifact_hash: str, relpath: str) -> Iterator[bytes]: ...
    def commit(
        self, manifest: ArtifactManifest, src: Path, *, move: bool, replace: bool,
        progress: ProgressCallback | None,
    ) -> None: ...
    def local_files_dir(self, artifact_hash: str) -> Path | None: ...
    def read_key(self, key: str) -> bytes | None: ...
    def write_key(self, key: str, data: bytes) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]: ...


class LocalBackend:
    """Objects in a local directory; commits by atomic rename of a fully written directory."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        for sub in ("objects", "index", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def object_uri(self, artifact_hash: str) -> str:
        return (self.root / "objects" / artifact_hash).as_uri()

    def _object_dir(self, artifact_hash: str) -> Path:
        return self.root / "objects" / validate_hash(artifact_hash)

    def read_manifest_bytes(self, artifact_hash: str) -> bytes | None:
        try:
            return (self._object_dir(artifact_hash) / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            return None

    def list_object_files(self, artifact_hash: str) -> list[str]:
        files_dir = self._object_dir(artifact_hash) / "files"
        if not files_dir.is_dir():
            return []
        return sorted(p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*") if p.is_file())

    def iter_file(self, artifact_hash: str, relpath: str) -> Iterator[bytes]:
        path = self._object_dir(artifact_hash) / "files" / validate_relpath(relpath)
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def local_files_dir(self, artifact_hash: str) -> Path | None:
        return self._object_dir(artifact_hash) / "files"

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        path = self.root / "tmp" / f"build-{uuid.uuid4().hex}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(
        self, manifest: ArtifactManifest, src: Path, *, move: bool, replace: bool,
        progress: ProgressCallback | None,
    ) -> None:
        artifact_hash = manifest.sha256
        staging = self.root / "tmp" / f"{artifact_hash}.{uuid.uuid4().hex}"
        files_dir = staging / "files"
        files_dir.mkdir(parents=True)
        done, total = 0, manifest.total_bytes
        try:
            for entry in manifest.files:
                source = src / entry.path
                target = files_dir / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    os.replace(source, target)
                else:
                    shutil.copyfile(source, target)
                with open(target, "rb") as handle:
                    os.fsync(handle.fileno())
                done += entry.bytes
                if progress:
                    progress(entry.path, done, total)
            manifest_path = staging / MANIFEST_NAME
            with open(manifest_path, "wb") as handle:
                handle.write(manifest.canonical_bytes())
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(staging)
            final = self._object_dir(artifact_hash)
            if replace and final.exists():
                quarantine = self.root / "quarantine"
                quarantine.mkdir(exist_ok=True)
                os.rename(final, quarantine / f"{artifact_hash}.{int(time.time())}")
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / MANIFEST_NAME).exists():
                    raise
                # Another writer committed the same content first: identical bytes, keep theirs.
            _fsync_dir(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read_key(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_key(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )


class S3Backend:
    """Objects under an S3 prefix; commits by uploading every file, then the manifest."""

    def __init__(self, client: Any, bucket: str, prefix: str, cache_dir: Path):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_dir = Path(cache_dir)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def object_uri(self, artifact_hash: str) -> str:
        return f"s3://{self.bucket}/{self._key('objects/' + artifact_hash)}"

    def read_key(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_key(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def list_keys(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        strip = len(self._key(""))
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][strip:].lstrip("/") for item in page.get("Contents", []))
        return sorted(keys)

    def read_manifest_bytes(self, artifact_hash: str) -> bytes | None:
        return self.read_key(f"objects/{validate_hash(artifact_hash)}/{MANIFEST_NAME}")

    def list_object_files(self, artifact_hash: str) -> list[str]:
        prefix = f"objects/{validate_hash(artifact_hash)}/files/"
        return [key[len(prefix):] for key in self.list_keys(prefix)]

    def iter_file(self, artifact_hash: str, relpath: str) -> Iterator[bytes]:
        key = self._key(f"objects/{validate_hash(artifact_hash)}/files/{validate_relpath(relpath)}")
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
        yield from body.iter_chunks(CHUNK)

    def local_files_dir(self, artifact_hash: str) -> Path | None:
        return None

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="llm-assets-build-") as tmp:
            yield Path(tmp)

    def commit(
        self, manifest: ArtifactManifest, src: Path, *, move: bool, replace: bool,
        progress: ProgressCallback | None,
    ) -> None:
        artifact_hash = manifest.sha256
        done, total = 0, manifest.total_bytes
        for entry in manifest.files:
            key = self._key(f"objects/{artifact_hash}/files/{entry.path}")
            self.client.upload_file(str(src / entry.path), self.bucket, key)
            done += entry.bytes
            if progress:
                progress(entry.path, done, total)
        # The manifest goes last: until it exists, readers do not see the object at all.
        self.write_key(f"objects/{artifact_hash}/{MANIFEST_NAME}", manifest.canonical_bytes())


class ArtifactStore:
    """Hashing, verification and the fingerprint index on top of a backend."""

    def __init__(self, backend: StoreBackend, cache_dir: Path | None = None):
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "llm-assets-cache"

    # -- writing ---------------------------------------------------------------------------
    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """A scratch directory to build an artifact in; ``put_dir(..., move=True)`` is then free."""
        return self.backend.staging_dir()

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
                problems.append(
                    f"{entry.path}: sha256 {digest.hexdigest()[:12]} ({size} bytes) does not match "
                    f"the manifest's {entry.sha256[:12]} ({entry.bytes} bytes)"
                )
        expected = {entry.path for entry in manifest.files}
        problems.extend(
            f"{path}: not in the manifest" for path in self.backend.list_object_files(artifact_hash)
            if path not in expected
        )
        return VerifyReport(artifact_hash, tuple(problems))

    def local_dir(self, artifact_hash: str, *, verify: bool = False) -> Path:
        """A local directory holding the object's files (in place locally, a cache for S3)."""
        if verify:
            report = self.verify(artifact_hash)
            if not report.ok:
                raise ArtifactCorruptError(artifact_hash, list(report.problems))
        manifest = self.manifest(artifact_hash)
        in_place = self.backend.local_files_dir(artifact_hash)
        if in_place is not None:
            return in_place
        cached = self.cache_dir / artifact_hash
        if cached.is_dir():
            return cached
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{artifact_hash[:12]}.", dir=self.cache_dir))
        try:
            for entry in manifest.files:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with open(target, "wb") as handle:
                    for chunk in self.backend.iter_file(artifact_hash, entry.path):
                        digest.update(chunk)
                        handle.write(chunk)
                if digest.hexdigest() != entry.sha256:
                    raise ArtifactCorruptError(artifact_hash, [f"{entry.path}: downloaded bytes do not match the manifest"])
            try:
                os.rename(staging, cached)
            except OSError:
                if not cached.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cached

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
    """Open a store from a URI: a local path, ``file:///path`` or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if s3_client is None:
            raise ArtifactStoreError(f"store {uri} is on S3 but no S3 client was configured")
        if not parsed.netloc:
            raise ArtifactStoreError(f"store URI {uri!r} names no bucket; use s3://bucket/prefix")
        cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "llm-assets-cache"
        return ArtifactStore(S3Backend(s3_client, parsed.netloc, parsed.path, cache), cache)
    if parsed.scheme in ("file", ""):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        return ArtifactStore(LocalBackend(path), Path(cache_dir) if cache_dir else None)
    raise ArtifactStoreError(f"store URI {uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
