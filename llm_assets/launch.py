"""The asset's side of a worker (`llm_assets.worker`): start it through Dagster Pipes, and turn
its failure into one line the run's page shows."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_pipes import PipesDefaultMessageWriter, PipesParams


class DrainingFileMessageReader(dg.PipesMessageReader):
    """Dagster's temporary-file message reader, except that once the session closes it reads the
    file to its end. Dagster's own (1.13, `tail_file`) stops when a read finds nothing new and the
    session has closed by the time it looks: a worker that writes its last messages (its result,
    its closing message) and exits in between loses them, and the step fails on a result with
    nothing in it. Here the session's state is taken before each read, so whatever was written
    before it closed is read."""

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[PipesParams]:
        with tempfile.TemporaryDirectory(prefix="llm-assets-pipes-") as scratch:
            path = Path(scratch) / "messages"
            path.touch()
            closed = threading.Event()
            reader = threading.Thread(target=self._read, args=(path, handler, closed), daemon=True)
            reader.start()
            try:
                yield {PipesDefaultMessageWriter.FILE_PATH_KEY: str(path),
                       PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False}
            finally:
                closed.set()
                reader.join()

    @staticmethod
    def _read(path: Path, handler: Any, closed: threading.Event) -> None:
        try:
            with open(path, encoding="utf-8") as stream:
                while True:
                    ended = closed.is_set()
                    at = stream.tell()
                    line = stream.readline()
                    if line.endswith("\n"):
                        handler.handle_message(json.loads(line))
                    elif ended:  # all read (a killed worker's torn last line is not a message)
                        return
                    else:  # nothing new, or a line still being written
                        stream.seek(at)
                        time.sleep(0.01)
        except Exception:
            handler.report_pipes_framework_exception("the worker's message reader", sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a local temporary file."


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
