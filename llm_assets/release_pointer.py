"""The "current release" pointer of each model size, and its history, in the artifact store.

A release is an immutable artifact (`release.json`: the model, its eval report, its whole lineage
and every gate verdict). Promoting it or rolling back to an earlier one only moves a small
pointer, `releases/p=<size>/current.json`; every move is also appended to
`releases/p=<size>/history/`, so each release ever promoted stays addressable by its hash. The
pointer lives in the store, next to the artifacts, so servers and every instance agree on it.

With a canary (`stages.serving.canary`), a new release is first proposed: `releases/p=<size>/candidate.json`
names it while the server answers a fraction of the traffic with it, and the canary's gate then
promotes it (the current pointer moves) or rejects it (the current pointer stays). Proposals and
rejections are moves of the history too, so `llm-assets releases` shows the whole chain.
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
# The tag of an asset whose artifact depends on a size's release pointers (current and candidate),
# which live outside the asset graph: a drive never leaves it alone after a pointer moved.
READS_RELEASE_POINTER = {"llm-assets/reads": "release-pointer"}


class ReleaseError(LookupError):
    """No such release; the message lists what there is."""


@dataclass(frozen=True)
class ReleaseMove:
    partition: str
    sha256: str  # the release artifact now current (candidate, reject: the candidate proposed, or turned down)
    previous: str | None  # the one it replaced (candidate, reject: the current release, which stays)
    action: Literal["promote", "rollback", "candidate", "reject"]
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
    moved = _record_move(store, partition, sha256, action, by)
    store.backend.write_key(f"{_prefix(partition)}/current.json", _body(moved))
    if candidate_release(store, partition) == sha256:  # a promoted candidate is no longer one
        store.backend.write_key(f"{_prefix(partition)}/candidate.json", _body(moved))
    return moved


def candidate_release(store: ArtifactStore, partition: str) -> str | None:
    """The hash of the release proposed as this model size's canary and not yet decided, if any."""
    data = store.backend.read_key(f"{_prefix(partition)}/candidate.json")
    move = ReleaseMove(**json.loads(data)) if data is not None else None
    return move.sha256 if move is not None and move.action == "candidate" else None


def propose_release(store: ArtifactStore, partition: str, sha256: str, by: str) -> ReleaseMove:
    """Name `sha256` the model size's candidate: served next to the current release, not yet promoted."""
    moved = _record_move(store, partition, sha256, "candidate", by)
    store.backend.write_key(f"{_prefix(partition)}/candidate.json", _body(moved))
    return moved


def reject_candidate(store: ArtifactStore, partition: str, sha256: str, by: str) -> ReleaseMove:
    """Turn the candidate `sha256` down: the current release stays, the candidate is no longer served."""
    if candidate_release(store, partition) != sha256:
        raise ReleaseError(f"release {sha256[:12]} is not the candidate of {partition} "
                           f"(the candidate is {candidate_release(store, partition) or 'none'})")
    moved = _record_move(store, partition, sha256, "reject", by)
    store.backend.write_key(f"{_prefix(partition)}/candidate.json", _body(moved))
    return moved


def promote_or_propose(store: ArtifactStore, partition: str, sha256: str, canary: bool, by: str) -> str:
    """What the release step does with a release it stored: promote it, or, with a canary and a
    current release to compare it with, propose it as the candidate (a candidate its canary turned
    down is not proposed again); leave a current release fine-tuned from it alone. Says what it did."""
    current = current_release(store, partition)
    if current == sha256:
        return f"release[{partition}]: {sha256[:12]} is already current"
    if current is not None and sha256 in fine_tuned_from(store, current):
        return (f"release[{partition}]: {current[:12]} is current and was fine-tuned from {sha256[:12]}; the pointer "
                f"stays (`llm-assets rollback --release {sha256[:12]}` goes back to it)")
    if not canary or current is None:
        move_release(store, partition, sha256, "promote", by=by)
        return f"release[{partition}]: promoted {sha256[:12]} (was {current[:12] if current else 'none'})"
    if candidate_release(store, partition) == sha256:
        return f"release[{partition}]: {sha256[:12]} is already the candidate; canary_report decides on it"
    rejected = [m for m in release_history(store, partition) if m.action == "reject" and m.sha256 == sha256]
    if rejected:
        return (f"release[{partition}]: {sha256[:12]} was rolled back by its canary ({rejected[-1].moved_at}, "
                f"{rejected[-1].by}); not proposed again: change what it is made of, or promote it by hand")
    propose_release(store, partition, sha256, by=by)
    return (f"release[{partition}]: {sha256[:12]} is the candidate next to {current[:12]}; serve both "
            f"(llm-assets serve --candidate {sha256[:12]}) and materialize canary_report to promote or roll it back")


def _record_move(store: ArtifactStore, partition: str, sha256: str, action: str, by: str) -> ReleaseMove:
    """Append a move to the size's history (before any pointer names it: a pointer never names a
    move the history lacks)."""
    if not store.exists(sha256):
        raise ReleaseError(f"release {sha256[:12]} is not in the artifact store")
    moved = ReleaseMove(partition, sha256, current_release(store, partition), action, by,
                        datetime.now(UTC).isoformat(timespec="microseconds"))
    stamp = moved.moved_at.replace(":", "").replace("+0000", "Z")
    store.backend.write_key(f"{_prefix(partition)}/history/{stamp}-{sha256[:12]}.json", _body(moved))
    return moved


def _body(move: ReleaseMove) -> bytes:
    return json.dumps(asdict(move), sort_keys=True).encode()


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


FINE_TUNED_FROM = "fine_tuned_from"  # release.json of the loop's fine-tune: the release it started from


def fine_tuned_from(store: ArtifactStore, sha256: str) -> list[str]:
    """The releases `sha256` descends from through the loop's fine-tunes, nearest first: a release
    re-stored from its own lineage never displaces one fine-tuned from it."""
    chain, seen = [], {sha256}
    parent = read_release(store, sha256).get(FINE_TUNED_FROM)
    while parent and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        parent = read_release(store, parent).get(FINE_TUNED_FROM)
    return chain


def current_release_document(store: ArtifactStore, partition: str) -> dict[str, Any] | None:
    sha = current_release(store, partition)
    return read_release(store, sha) if sha else None
