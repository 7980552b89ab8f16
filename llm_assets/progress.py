"""Resumable steps: intermediate checkpoints committed to the store under the step's fingerprint.

A training step that crashes (a killed pod, a SIGKILLed run) is rematerialized with the same
fingerprint, finds its last committed checkpoint here and continues from it. Every training stage
(our pretraining loop, the trl trainers) commits and resumes through this one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm_assets.store import ArtifactCorruptError, ArtifactRef, ArtifactStore, index_key


class ResumeError(RuntimeError):
    """The committed checkpoint cannot be used; the message says how to start over."""


@dataclass(frozen=True)
class StepProgress:
    store: ArtifactStore
    asset: str
    partition: str | None
    fingerprint: str

    @property
    def key(self) -> str:
        """Where the progress entry lives in the store (delete it to start the step over)."""
        return index_key(self.asset, self.partition, self.fingerprint, namespace="progress")

    def resume_point(self) -> tuple[Path, int] | None:
        """The last committed checkpoint (a verified local directory) and its step, if any."""
        entry = self.store.progress_lookup(self.asset, self.partition, self.fingerprint)
        if entry is None:
            return None
        try:
            return self.store.local_dir(entry["artifact"], verify=True), int(entry["step"])
        except ArtifactCorruptError as exc:
            raise ResumeError(f"the committed checkpoint of step {entry['step']} is corrupt ({exc}); "
                              f"delete {self.key} in the store to run this step from the start") from exc

    def commit(self, checkpoint: Path, step: int) -> ArtifactRef:
        """Store a checkpoint directory and make it the one a rerun resumes from."""
        ref = self.store.put_dir(checkpoint)
        self.store.progress_record(self.asset, self.partition, self.fingerprint, ref.sha256, step)
        return ref
