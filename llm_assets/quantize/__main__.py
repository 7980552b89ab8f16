"""Command line: quantize one model as a JSON spec says (run in the quantization environment).

    .venv-quant/bin/python -m llm_assets.quantize --spec quantize.json

The spec is a `llm_assets.quantize.worker.QuantizeSpec` as JSON. Launched by a Dagster Pipes
client it reports to Dagster; otherwise it prints one JSON line per event.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_assets.quantize.worker import QuantizeSpec, run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_assets.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON quantization spec")
    run(QuantizeSpec.model_validate_json(parser.parse_args().spec.read_text()))


if __name__ == "__main__":
    main()
