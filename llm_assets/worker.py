"""What a worker process launched through Dagster Pipes shares: its voice, and its spec's base.

Training and quantization run outside the Dagster step's process (torchrun's ranks; an
environment of their own). The launching asset writes a JSON spec and starts the worker with a
Pipes client; the worker logs progress into the run and reports its figures as the
materialization's metadata. Started by hand (no Pipes), it prints the same events as JSON lines.
This module needs only `dagster-pipes` and pydantic, never Dagster itself.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, PipesEnvVarParamsLoader, open_dagster_pipes
from pydantic import BaseModel, ConfigDict


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


def write_failure(error_file: str | None, exc: BaseException) -> None:
    """Leave the failure where the launcher reads it: its first line becomes the step's error."""
    if error_file:
        Path(error_file).write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
