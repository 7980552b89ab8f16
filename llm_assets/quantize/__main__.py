"""Command line: quantize one model as a JSON spec says (run in the quantization environment).

    .venv-quant/bin/python -m llm_assets.quantize --spec quantize.json
    .venv-quant/bin/python -m llm_assets.quantize --serve

The spec is a `llm_assets.quantize.worker.QuantizeSpec` as JSON. Launched by a Dagster Pipes
client it reports to Dagster; otherwise it prints one JSON line per event. With `--serve` it
stays up: it reads the path of one spec per line on stdin and answers each with its JSON events,
then a `done` (or `failed`) line, so that every partition of a drive pays for starting torch,
transformers and gptqmodel once (`resources.quantize_environment`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from llm_assets.quantize.worker import QuantizeSpec, run


def serve() -> None:
    """One quantization per spec path read from stdin; a failed one leaves the worker up."""
    for line in sys.stdin:
        try:
            run(QuantizeSpec.model_validate_json(Path(line.strip()).read_text()))
        except Exception as exc:  # written to the spec's error_file by run(); the launcher reads it
            print(json.dumps({"event": "failed", "message": f"{type(exc).__name__}: {exc}"}), flush=True)
        else:
            print(json.dumps({"event": "done"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_assets.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spec", type=Path, help="JSON quantization spec")
    mode.add_argument("--serve", action="store_true", help="quantize the spec named on each line of stdin")
    args = parser.parse_args()
    try:
        if args.serve:
            serve()
        else:
            run(QuantizeSpec.model_validate_json(args.spec.read_text()))
    finally:
        # The answers are out: spare the exit the interpreter's last full garbage collection over
        # torch's, transformers' and gptqmodel's objects, seconds that the launching step waits for.
        gc.freeze()


if __name__ == "__main__":
    main()
