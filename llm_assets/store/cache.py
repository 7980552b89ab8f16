"""The local copy of a remote (S3) store's objects: where it lives, how it is filled and checked.

A remote object is read through a local folder, ``<cache>/<hash>/<files>``. The folder appears
only complete: every file is downloaded into ``<cache>/tmp/download-…``, hashed as it streams and
matched against the object's manifest, and the folder is then renamed into place. Before handing
a cached folder out again, the store checks it: with ``verify=True`` every file is re-hashed; with
``verify=False`` the file list and sizes are compared (no hashing). A file that differs, is
missing, is not in the manifest, or is a symbolic link makes the copy corrupt: it is removed and
downloaded again.

Where the cache lives: the directory configured (``cache_dir``, ``$LLM_ASSETS_CACHE_DIR`` through
the project's settings) is used as it is; otherwise a per-user folder,
``$XDG_CACHE_HOME/llm-assets/<bucket>/<prefix>`` (``~/.cache`` when ``XDG_CACHE_HOME`` is unset),
the prefix percent-encoded into one folder name (``%2F`` for a bucket's root). Without a usable
home it falls back to ``<system temp>/llm-assets-<uid>/…``. The default folders are created
private (mode 0700) and refused unless owned by the user and writable by no one else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from llm_assets.store.errors import ArtifactCorruptError, ArtifactStoreError
from llm_assets.store.fileio import hash_file, kept_fresh
from llm_assets.store.objects import ArtifactManifest, FileEntry, mismatch_problem, validate_hash

if TYPE_CHECKING:
    from llm_assets.store.backends import StoreBackend

CACHE_DIR_ENV = "LLM_ASSETS_CACHE_DIR"
"""The environment variable the project's settings read the configured cache directory from."""

STAGING = "tmp"
"""The cache's folder of downloads (and, for S3, builds) in progress: staging, never objects."""


def _user_cache_home() -> Path | None:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg)
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no password entry (an arbitrary container uid)
        return None
    if not home.is_absolute() or home == Path(home.anchor):
        return None
    return home / ".cache"


def default_cache_base() -> Path:
    """The per-user folder every default cache lives under."""
    home = _user_cache_home()
    if home is not None:
        return home / "llm-assets"
    return Path(tempfile.gettempdir()) / f"llm-assets-{os.getuid()}"


def default_s3_cache_dir(bucket: str, prefix: str) -> Path:
    """Where the objects of ``s3://bucket/prefix`` are cached when no directory is configured."""
    return default_cache_base() / bucket / (quote(prefix.strip("/"), safe="") or "%2F")


class LocalCache:
    """A folder of verified local copies of remote objects, one ``<hash>/`` folder each."""

    def __init__(self, root: Path, *, private_base: Path | None = None):
        self.root = Path(root).expanduser()
        # The default location: every folder from private_base down to root must be ours alone.
        self.private_base = private_base
        self._ready = False

    @classmethod
    def for_s3(cls, bucket: str, prefix: str, configured: str | Path | None = None) -> LocalCache:
        if configured:
            return cls(Path(configured))
        return cls(default_s3_cache_dir(bucket, prefix), private_base=default_cache_base())

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING

    def path(self, artifact_hash: str) -> Path:
        return self.root / validate_hash(artifact_hash)

    def has(self, artifact_hash: str) -> bool:
        return os.path.lexists(self.path(artifact_hash))

    def ensure(self) -> Path:
        """Create the cache (and its staging folder) if needed; refuse a default one that is not private."""
        if self._ready:
            return self.root
        try:
            if self.private_base is None:
                self.staging_root.mkdir(parents=True, exist_ok=True)
            else:
                self._make_private()
        except OSError as exc:
            raise ArtifactStoreError(
                f"cannot create the local cache {self.root}: {exc}; set {CACHE_DIR_ENV} to a writable directory"
            ) from exc
        self._ready = True
        return self.root

    def _make_private(self) -> None:
        base = self.private_base
        base.parent.mkdir(parents=True, exist_ok=True)
        folders = [base]
        for part in self.staging_root.relative_to(base).parts:
            folders.append(folders[-1] / part)
        uid = os.getuid()
        for folder in folders:
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
            info = os.lstat(folder)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
                raise ArtifactStoreError(
                    f"the local cache folder {folder} is not private to this user (owner uid {info.st_uid}, "
                    f"mode {stat.filemode(info.st_mode)}); remove it, or set {CACHE_DIR_ENV} to a directory "
                    "of your own"
                )

    def advice(self, artifact_hash: str) -> str:
        return (
            f"The stored object verified; the local copy {self.path(artifact_hash)} could not be replaced: "
            f"remove it (or the whole cache {self.root}) and retry, or set {CACHE_DIR_ENV} to a directory "
            "of your own"
        )

    def problems(self, artifact_hash: str, manifest: ArtifactManifest, *, full: bool) -> list[str]:
        """What is wrong with the cached copy: each file re-hashed (``full``) or its size compared,
        missing files, files not in the manifest, links and special files. Empty when it is sound."""
        folder = self.path(artifact_hash)
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            return [f"{folder.name}: the cached copy is missing"]
        if not stat.S_ISDIR(info.st_mode):
            return [f"{folder.name}: the cached copy is not a directory (a link or a file)"]
        expected = {entry.path: entry for entry in manifest.files}
        seen: set[str] = set()
        problems = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames.sort()
            for name in sorted([*dirnames, *filenames]):
                path = Path(dirpath) / name
                rel = path.relative_to(folder).as_posix()
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode):
                    continue
                seen.add(rel)
                if stat.S_ISLNK(mode):
                    problems.append(f"{rel}: a symbolic link in the cached copy")
                elif not stat.S_ISREG(mode):
                    problems.append(f"{rel}: not a regular file")
                elif rel not in expected:
                    problems.append(f"{rel}: not in the manifest")
                elif full:
                    digest, size = hash_file(path)
                    entry = expected[rel]
                    if size != entry.bytes or digest != entry.sha256:
                        problems.append(mismatch_problem(rel, entry.sha256, entry.bytes, digest, size))
                elif (size := os.lstat(path).st_size) != expected[rel].bytes:
                    problems.append(f"{rel}: {size} bytes, the manifest says {expected[rel].bytes}")
        problems.extend(f"{rel}: missing" for rel in sorted(expected) if rel not in seen)
        return problems

    def evict(self, artifact_hash: str, problems: list[str]) -> None:
        """Remove a corrupt cached copy (moved aside first: a reader of it keeps its open files)."""
        self.ensure()
        folder = self.path(artifact_hash)
        aside = self.staging_root / f"evicted-{artifact_hash[:12]}-{uuid.uuid4().hex}"
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return  # another reader removed it first
        except OSError as exc:
            raise ArtifactCorruptError(
                artifact_hash, [*problems, f"{folder.name}: cannot remove the cached copy: {exc}"],
                where="the local copy", advice=self.advice(artifact_hash),
            ) from exc
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)

    def fill(
        self, backend: StoreBackend, artifact_hash: str, manifest: ArtifactManifest, *, check_extras: bool
    ) -> bool:
        """Download the object into the cache, every file hashed as it streams; True when this call
        put the copy in place, False when another process had just done so (check theirs).

        Raises :class:`ArtifactCorruptError` naming each remote file that is missing or differs
        (and, with ``check_extras``, each remote file the manifest does not list).
        """
        self.ensure()
        staging = self.staging_root / f"download-{artifact_hash[:12]}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            with kept_fresh(staging):
                problems = []
                for entry in manifest.files:
                    problem = _download(backend, artifact_hash, entry, staging / entry.path)
                    if problem:
                        problems.append(problem)
                if check_extras:
                    listed = {entry.path for entry in manifest.files}
                    problems.extend(
                        f"{path}: not in the manifest" for path in backend.list_object_files(artifact_hash)
                        if path not in listed
                    )
                if problems:
                    raise ArtifactCorruptError(artifact_hash, problems)
                try:
                    os.rename(staging, self.path(artifact_hash))
                except OSError:
                    if not self.has(artifact_hash):
                        raise
                    return False  # another reader filled it first
                return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _download(backend: StoreBackend, artifact_hash: str, entry: FileEntry, target: Path) -> str | None:
    """Stream one remote file to ``target``, hashing it; the problem with it, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with open(target, "wb") as handle:
            for chunk in backend.iter_file(artifact_hash, entry.path):
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
    except FileNotFoundError:
        return f"{entry.path}: missing"
    if size != entry.bytes or digest.hexdigest() != entry.sha256:
        return mismatch_problem(entry.path, entry.sha256, entry.bytes, digest.hexdigest(), size)
    return None
