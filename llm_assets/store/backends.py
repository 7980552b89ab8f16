"""Where objects' bytes live: a local directory or an S3 prefix.

A backend is raw object storage under one root and knows nothing about hashing; each commits a
write by making the manifest visible last, so a reader that finds a manifest finds every file it
names:

- local directory: files go to a private staging directory, are fsynced, then the whole directory
  is renamed into ``objects/`` in one atomic step;
- S3: files are uploaded under the object's prefix, then the manifest.

A writer killed halfway leaves only staging debris (``tmp/`` locally, manifest-less files on S3)
that no reader ever treats as an object. Staging folders live under ``staging_root()`` (the
store's ``tmp/`` locally, the local cache's ``tmp/`` for S3); a live writer touches its folder
(:func:`~llm_assets.store.fileio.kept_fresh`), so a sweep by age removes only a dead writer's.

The raw key functions (``read_key``, ``write_key``, ``list_keys``) take store-relative keys and
refuse any that could leave the store's root (:func:`~llm_assets.store.objects.validate_key`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from llm_assets.store.cache import LocalCache
from llm_assets.store.errors import InvalidKeyError
from llm_assets.store.fileio import CHUNK, build_folder, fsync_path, kept_fresh, write_atomic
from llm_assets.store.objects import MANIFEST_NAME, ArtifactManifest, validate_hash, validate_key, validate_relpath

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(relpath, bytes_done, bytes_total)`` after each file is written."""

# A local file changed more recently than this is vouched for by no signature (see
# LocalBackend.file_signatures): the file system's clock ticks every few milliseconds.
SETTLE_NS = 2_000_000_000


class StoreBackend(Protocol):
    """Raw object storage under one root; knows nothing about hashing."""

    def object_uri(self, artifact_hash: str) -> str: ...
    def read_manifest_bytes(self, artifact_hash: str) -> bytes | None: ...
    def list_object_files(self, artifact_hash: str) -> list[str]: ...
    def iter_file(self, artifact_hash: str, relpath: str) -> Iterator[bytes]: ...
    def file_signatures(self, artifact_hash: str) -> dict[str, list[Any]] | None: ...
    def commit(
        self, manifest: ArtifactManifest, src: Path, *, move: bool, replace: bool,
        progress: ProgressCallback | None,
    ) -> None: ...
    def local_files_dir(self, artifact_hash: str) -> Path | None: ...
    def read_key(self, key: str) -> bytes | None: ...
    def write_key(self, key: str, data: bytes) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def staging_dir(self) -> contextlib.AbstractContextManager[Path]: ...
    def staging_root(self) -> Path | None: ...


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: a store key, optionally ending with one '/'."""
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix, "store key prefix")
    return prefix


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

    def file_signatures(self, artifact_hash: str) -> dict[str, list[Any]] | None:
        """(inode, size, mtime, ctime) of every file of the object, manifest included; None while a
        file changed less than two seconds ago.

        Any write, rename or `touch` through the file system sets a file's ctime to the clock, and no
        program can set it back; damage below the file system (the medium, a file-system bug) changes
        none of these, and is found by a full `verify` (integrity gates, `llm-assets verify`). The
        clock is coarse (a few milliseconds): a write in the same tick as the one recorded could leave
        the times as they were, so a file that changed just now is vouched for by nothing (as git
        treats a racily clean file)."""
        base = self._object_dir(artifact_hash)
        settled = time.time_ns() - SETTLE_NS
        found = {}
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                stat = os.stat(os.path.join(dirpath, name))
                if stat.st_ctime_ns > settled:
                    return None
                found[Path(dirpath, name).relative_to(base).as_posix()] = [
                    stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        return found

    def local_files_dir(self, artifact_hash: str) -> Path | None:
        return self._object_dir(artifact_hash) / "files"

    def staging_root(self) -> Path | None:
        return self.root / "tmp"

    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        return build_folder(self.root / "tmp")

    def commit(
        self, manifest: ArtifactManifest, src: Path, *, move: bool, replace: bool,
        progress: ProgressCallback | None,
    ) -> None:
        artifact_hash = manifest.sha256
        staging = self.root / "tmp" / f"{artifact_hash}.{uuid.uuid4().hex}"
        files_dir = staging / "files"
        files_dir.mkdir(parents=True)
        try:
            with kept_fresh(staging):
                self._fill_staging(manifest, src, staging, move=move, progress=progress)
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
            fsync_path(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _fill_staging(
        manifest: ArtifactManifest, src: Path, staging: Path, *, move: bool, progress: ProgressCallback | None
    ) -> None:
        """Every file durable in ``staging/files``, then the manifest, then the folder itself."""
        done, total = 0, manifest.total_bytes
        for entry in manifest.files:
            source = src / entry.path
            target = staging / "files" / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(source, target)
            else:
                shutil.copyfile(source, target)
            fsync_path(target)
            done += entry.bytes
            if progress:
                progress(entry.path, done, total)
        with open(staging / MANIFEST_NAME, "wb") as handle:
            handle.write(manifest.canonical_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        fsync_path(staging)

    def read_key(self, key: str) -> bytes | None:
        try:
            return (self.root / validate_key(key)).read_bytes()
        except FileNotFoundError:
            return None

    def write_key(self, key: str, data: bytes) -> None:
        write_atomic(self.root / validate_key(key), data)

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / _validate_prefix(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )


_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


class S3Backend:
    """Objects under an S3 prefix; commits by uploading every file, then the manifest."""

    def __init__(self, client: Any, bucket: str, prefix: str, cache_dir: str | Path | None = None):
        self.client = client
        if not _BUCKET_RE.match(bucket or ""):
            raise InvalidKeyError(f"S3 bucket name {bucket!r} is not valid")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix, "S3 store prefix")
        # Local copies of objects for reading, and this backend's staging folders (cache/tmp/).
        self.cache = LocalCache.for_s3(bucket, self.prefix, cache_dir)
        self.cache_dir = self.cache.root

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def object_uri(self, artifact_hash: str) -> str:
        return f"s3://{self.bucket}/{self._key('objects/' + artifact_hash)}"

    def read_key(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(validate_key(key)))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_key(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(validate_key(key)), Body=data)

    def _list(self, prefix: str) -> list[str]:
        full = self._key(_validate_prefix(prefix)).rstrip("/") + "/"
        strip = len(self._key(""))
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][strip:].lstrip("/") for item in page.get("Contents", []))
        return sorted(keys)

    def list_keys(self, prefix: str) -> list[str]:
        # A key the bucket holds but read_key would refuse (written behind the store's back, e.g.
        # 'index/../x') is not listed: listing only names keys this API can address.
        return [key for key in self._list(prefix) if _is_valid_key(key)]

    def read_manifest_bytes(self, artifact_hash: str) -> bytes | None:
        return self.read_key(f"objects/{validate_hash(artifact_hash)}/{MANIFEST_NAME}")

    def list_object_files(self, artifact_hash: str) -> list[str]:
        prefix = f"objects/{validate_hash(artifact_hash)}/files/"
        # Unfiltered: verify() reports every stray file, however it is named; none is ever opened.
        return [key[len(prefix):] for key in self._list(prefix)]

    def iter_file(self, artifact_hash: str, relpath: str) -> Iterator[bytes]:
        key = self._key(f"objects/{validate_hash(artifact_hash)}/files/{validate_relpath(relpath)}")
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
        yield from body.iter_chunks(CHUNK)

    def file_signatures(self, artifact_hash: str) -> dict[str, list[Any]] | None:
        """(ETag, size, last modified) of every file of the object, manifest included, from one
        listing. An S3 object changes only whole, by a PUT that gives it a new ETag (derived from its
        bytes) and LastModified; S3 checks the bytes at rest itself."""
        prefix = self._key(f"objects/{validate_hash(artifact_hash)}/")
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len(prefix):]] = [item["ETag"], item["Size"], item["LastModified"].isoformat()]
        return found

    def local_files_dir(self, artifact_hash: str) -> Path | None:
        return None

    def staging_root(self) -> Path | None:
        return self.cache.staging_root

    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        self.cache.ensure()
        return build_folder(self.cache.staging_root)

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
