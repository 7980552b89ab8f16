"""The asset's side of a worker (`llm_assets.worker`): start it through Dagster Pipes, and turn
its failure into one line the run's page shows."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg


def torchrun_command(module: str, spec_path: Path, processes: int) -> list[str]:
    """A worker's command: `python -m module --spec spec_path`, or torchrun starting it once per
    rank on this machine when it takes more than one process."""
    entry = ["-m", module, "--spec", str(spec_path)]
    if processes == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *entry]


def run_worker(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    command: Sequence[str],
    *,
    error_file: Path,
    what: str,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the worker to completion; returns the metadata it reported.

    The worker's traceback is in the run's log (stderr and the Pipes closing event); the step's
    failure says what went wrong in one line, read from `error_file` (see `write_failure`).
    """
    try:
        invocation = client.run(context=context, command=list(command), env=dict(env or {}))
    except Exception:
        if not error_file.exists():
            raise
        raise dg.Failure(f"{what} failed: {error_file.read_text().splitlines()[0]}") from None
    return {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
