"""The "current release" pointer of each model size, and its history, in the artifact store.

A release is an immutable artifact (`release.json`: the model, its eval report, its whole lineage
and every gate verdict). Promoting it or rolling back to an earlier one only moves a small
pointer, `releases/p=<size>/current.json`; every move is also appended to
`releases/p=<size>/history/`, so each release ever promoted stays addressable by its hash. The
pointer lives in the store, next to the artifacts, so servers and every instance agree on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

from llm_assets.store import ArtifactCorruptError, ArtifactStore

RELEASES = "releases"
RELEASE_JSON = "release.json"


class ReleaseError(LookupError):
    """No such release; the message lists what there is."""


@dataclass(frozen=True)
class ReleaseMove:
    partition: str
    sha256: str  # the release artifact now current
    previous: str | None  # the one it replaced
    action: Literal["promote", "rollback"]
    by: str  # the run that promoted, or who rolled back
    moved_at: str  # ISO 8601, UTC, microseconds: history sorts by it


def _prefix(partition: str) -> str:
    return f"{RELEASES}/p={quote(partition, safe='')}"


def current_release(store: ArtifactStore, partition: str) -> str | None:
    """The hash of the release artifact currently promoted for this model size, if any."""
    data = store.backend.read_key(f"{_prefix(partition)}/current.json")
    return ReleaseMove(**json.loads(data)).sha256 if data is not None else None


def move_release(store: ArtifactStore, partition: str, sha256: str,
                 action: Literal["promote", "rollback"], by: str) -> ReleaseMove:
    """Point the model size's current release at `sha256` (which must be a stored release)."""
    if not store.exists(sha256):
        raise ReleaseError(f"release {sha256[:12]} is not in the artifact store")
    moved = ReleaseMove(partition, sha256, current_release(store, partition), action, by,
                        datetime.now(UTC).isoformat(timespec="microseconds"))
    body = json.dumps(asdict(moved), sort_keys=True).encode()
    # History first: a pointer never names a move the history lacks.
    stamp = moved.moved_at.replace(":", "").replace("+0000", "Z")
    store.backend.write_key(f"{_prefix(partition)}/history/{stamp}-{sha256[:12]}.json", body)
    store.backend.write_key(f"{_prefix(partition)}/current.json", body)
    return moved


def release_history(store: ArtifactStore, partition: str | None = None) -> list[ReleaseMove]:
    """Every move of the pointer (of one model size, or all), oldest first."""
    prefix = _prefix(partition) + "/history/" if partition else f"{RELEASES}/"
    moves = [ReleaseMove(**json.loads(store.backend.read_key(key) or b"{}"))
             for key in store.backend.list_keys(prefix) if "/history/" in key]
    return sorted(moves, key=lambda m: (m.moved_at, m.partition))


def find_promoted(store: ArtifactStore, hash_prefix: str, partition: str | None = None) -> ReleaseMove:
    """The promotion of the release whose hash starts with `hash_prefix` (at least 6 characters)."""
    promoted = {m.sha256: m for m in release_history(store, partition) if m.action == "promote"}
    if len(hash_prefix) < 6:
        raise ReleaseError(f"give at least 6 characters of the release hash, not {hash_prefix!r}")
    found = [m for sha, m in promoted.items() if sha.startswith(hash_prefix.lower())]
    shown = "; ".join(f"{m.partition} {m.sha256[:12]} ({m.moved_at})" for m in promoted.values()) or "none yet"
    if not found:
        raise ReleaseError(f"no promoted release {hash_prefix!r}; promoted releases: {shown}")
    if len({(m.partition, m.sha256) for m in found}) > 1:
        raise ReleaseError(f"{hash_prefix!r} matches several releases; give more of the hash: {shown}")
    return found[0]


def read_release(store: ArtifactStore, sha256: str) -> dict[str, Any]:
    """A release's document, once its bytes match the release's manifest (which must hash to `sha256`)."""
    expected = next((f.sha256 for f in store.manifest(sha256).files if f.path == RELEASE_JSON), None)
    data = store.read_bytes(sha256, RELEASE_JSON)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ArtifactCorruptError(sha256, [f"{RELEASE_JSON}: sha256 {actual} does not match the manifest's "
                                            f"{expected}"])
    return json.loads(data)


def current_release_document(store: ArtifactStore, partition: str) -> dict[str, Any] | None:
    sha = current_release(store, partition)
    return read_release(store, sha) if sha else None
