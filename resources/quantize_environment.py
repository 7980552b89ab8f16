"""The Python environment quantization runs in: gptqmodel's own (it requires protobuf ≥ 7.34,
which Dagster's environment cannot hold; see llm_assets/quantize)."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

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

    def command(self, spec_path: Path) -> list[str]:
        self.libraries()
        return [self.python, "-m", "llm_assets.quantize", "--spec", str(spec_path)]


@functools.cache
def _probe(python: str) -> dict[str, str]:
    if not Path(python).is_file():
        raise dg.Failure(f"the quantization environment is missing: no interpreter at {python}. {REMEDY}")
    done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise dg.Failure(f"the quantization environment at {python} cannot run the worker: {last}. {REMEDY}")
    return json.loads(done.stdout)
