"""The Python environment quantization runs in: gptqmodel's own (it requires protobuf ≥ 7.34,
which Dagster's environment cannot hold; see llm_assets/quantize).

Starting that interpreter with torch, transformers, gptqmodel and torchao costs far more than
quantizing a small model, so one worker (`python -m llm_assets.quantize --serve`) per environment
and process quantizes every partition the process is asked for: the embedded driver runs a
drive's partitions in one process, one after the other. It is stopped when the process exits.
"""

from __future__ import annotations

import atexit
import functools
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

PYTHON_ENV = "LLM_ASSETS_QUANTIZE_PYTHON"
REMEDY = (f"Run `make install` (it builds .venv-quant from requirements-quantize.txt), or set ${PYTHON_ENV} to the "
          "python of an environment with those packages and this project installed with --no-deps.")
# Run in the environment: the worker's module imports (so the project and dagster-pipes are
# there), and the versions of the libraries that shape a quantized artifact.
PROBE = ("import json, importlib.metadata as m, llm_assets.quantize.worker as w; "
         "print(json.dumps({name: m.version(name) for name in w.LIBRARIES}))")


class QuantizeEnvironmentResource(dg.ConfigurableResource):
    """Where `python -m llm_assets.quantize` runs: an interpreter with requirements-quantize.txt and
    this project (installed without its dependencies)."""

    python: str = Field(description=f"The environment's interpreter (settings: ${PYTHON_ENV})")

    def libraries(self) -> dict[str, str]:
        """The quantization libraries' versions there (part of a quantized artifact's fingerprint:
        another gptqmodel may write other bytes); a clear failure when the worker cannot run there."""
        return _probe(self.python)

    def quantize(self, spec_path: Path, log: Callable[[str], None], error_file: Path, what: str) -> dict[str, Any]:
        """Quantize as the spec at `spec_path` says, in this environment's long-lived worker; returns
        the figures it reported. A failure raises `dg.Failure` naming `what` and the worker's error
        in one line (read from `error_file`, where the worker writes it)."""
        self.libraries()
        with _LOCK:
            worker = _WORKERS.get(self.python)
            if worker is None or worker.poll() is not None:
                worker = _WORKERS[self.python] = subprocess.Popen(
                    [self.python, "-m", "llm_assets.quantize", "--serve"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, bufsize=1)
            return _ask(worker, spec_path, log, error_file, what)


# One worker per environment's interpreter in this process; a lock, since a worker does one
# quantization at a time.
_WORKERS: dict[str, subprocess.Popen] = {}
# The last lines of a library's output logged with each answer.
LIBRARY_LINES_LOGGED = 200
_LOCK = threading.Lock()


def _ask(worker: subprocess.Popen, spec_path: Path, log: Callable[[str], None], error_file: Path,
         what: str) -> dict[str, Any]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(f"{spec_path}\n")
    worker.stdin.flush()
    reported: dict[str, Any] = {}
    # A library's own output (GPTQ prints a line per layer): kept and logged as one event when the
    # answer comes, since an event per line costs a commit to the event log each (about 1,100 for GPTQ).
    output: list[str] = []

    def log_output() -> None:
        if output:
            cut = len(output) - LIBRARY_LINES_LOGGED
            log("\n".join(([f"[{cut} earlier lines left out]"] if cut > 0 else []) + output[-LIBRARY_LINES_LOGGED:]))
            output.clear()

    for line in worker.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            output.append(line.rstrip())
        elif event["event"] == "result":
            reported = {key: _plain(value) for key, value in event["metadata"].items()}
        elif event["event"] == "done":
            log_output()
            return reported
        elif event["event"] == "failed":
            log_output()
            cause = error_file.read_text().splitlines()[0] if error_file.exists() else event["message"]
            raise dg.Failure(f"{what} failed: {cause}")
        else:
            log(event.get("message", line.rstrip()))
    log_output()
    code = worker.wait()  # its output ended before its answer: it died (its stderr is in the log)
    raise dg.Failure(f"{what} failed: the quantization worker {worker.args[0]} exited with code {code} "
                     "before it answered; its error output is above in the run's log")


def _plain(value: Any) -> Any:
    """A value as reported: the worker writes JSON metadata in Dagster Pipes' form."""
    return value["raw_value"] if isinstance(value, dict) and set(value) == {"raw_value", "type"} else value


@atexit.register
def _stop_workers() -> None:
    for worker in _WORKERS.values():
        if worker.poll() is None and worker.stdin is not None:
            worker.stdin.close()  # end of its input: the worker's loop ends
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


@functools.cache
def _probe(python: str) -> dict[str, str]:
    if not Path(python).is_file():
        raise dg.Failure(f"the quantization environment is missing: no interpreter at {python}. {REMEDY}")
    done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise dg.Failure(f"the quantization environment at {python} cannot run the worker: {last}. {REMEDY}")
    return json.loads(done.stdout)
