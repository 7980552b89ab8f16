"""The Python environment quantization runs in: gptqmodel's own (it requires protobuf ≥ 7.34,
which Dagster's environment cannot hold; see llm_assets/quantize)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

PYTHON_ENV = "LLM_ASSETS_QUANTIZE_PYTHON"


class QuantizeEnvironmentResource(dg.ConfigurableResource):
    """Where `python -m llm_assets.quantize` runs: an interpreter with requirements-quantize.txt and
    this project (installed without its dependencies)."""

    python: str = Field(description=f"The environment's interpreter (settings: ${PYTHON_ENV})")

    def command(self, spec_path: Path) -> list[str]:
        if not Path(self.python).is_file():
            raise dg.Failure(
                f"the quantization environment is missing: no interpreter at {self.python}. Run `make install` "
                f"(it builds .venv-quant from requirements-quantize.txt), or set ${PYTHON_ENV} to the python of an "
                "environment with those packages and this project installed with --no-deps."
            )
        return [self.python, "-m", "llm_assets.quantize", "--spec", str(spec_path)]
