"""What a worker process launched through Dagster Pipes shares: its voice, and its spec's base.

Training and quantization run outside the Dagster step's process (torchrun's ranks; an
environment of their own). The launching asset writes a JSON spec and starts the worker with a
Pipes client; the worker logs progress into the run and reports its figures as the
materialization's metadata. Started by hand (no Pipes), it prints the same events as JSON lines.
This module needs only `dagster-pipes` and pydantic, never Dagster itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, PipesEnvVarParamsLoader, open_dagster_pipes
from pydantic import BaseModel, ConfigDict

# prctl(2): the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def end_with_torchrun() -> None:
    """Under torchrun (Linux), end this rank when torchrun's agent ends. torchrun starts every rank
    in a session of its own, so a SIGKILL of the step's process group (a killed driver, a deleted
    pod's processes) ends the agent but would leave the ranks training, and committing checkpoints
    under the step's fingerprint beside the rerun that resumes from them."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerSpec(BaseModel):
    """A worker's instructions: strict and immutable, so a typo in a field is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Reporter:
    """The worker's voice: Dagster Pipes when a Pipes client launched us, JSON lines on stdout otherwise."""

    def __init__(self, pipes: PipesContext | None) -> None:
        self.pipes = pipes

    @classmethod
    def open(cls, speaks: bool = True) -> Reporter:
        """`speaks`: this process reports (of torchrun's ranks, only rank 0 does)."""
        launched_by_pipes = speaks and PipesEnvVarParamsLoader().is_dagster_pipes_process()
        return cls(open_dagster_pipes() if launched_by_pipes else None)

    def event(self, event: str, message: str, **fields: Any) -> None:
        if self.pipes is not None:
            self.pipes.log.info(message)
        else:
            print(json.dumps({"event": event, "message": message, **fields}), flush=True)

    def report(self, metadata: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)
        else:
            print(json.dumps({"event": "result", "metadata": metadata}), flush=True)

    def close(self) -> None:
        if self.pipes is not None:
            self.pipes.close()


def write_failure(error_file: str | None, exc: BaseException, *, rank: int | None = None) -> None:
    """Leave the failure where the launcher reads it: its first line becomes the step's error.

    With `rank` (every torchrun rank may call this), the first failure is kept and named by its
    rank: a rank that fails brings the others down with errors of their own that say less."""
    if not error_file:
        return
    text = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
    if rank is None:
        Path(error_file).write_text(text)
        return
    try:
        with open(error_file, "x") as out:
            out.write(f"rank {rank}: {text}")
    except FileExistsError:
        pass
