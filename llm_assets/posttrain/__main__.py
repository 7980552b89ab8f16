"""Command line: one trl stage described by a JSON spec; the torchrun entry point.

    torchrun --nproc_per_node=2 -m llm_assets.posttrain --spec run.json

The spec is a `llm_assets.posttrain.job.TrlRunSpec` as JSON. Launched by a Dagster Pipes client,
rank 0 reports to Dagster; otherwise it prints one JSON line per event ({"event": "log" |
"checkpoint" | "result", ...}).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed

from llm_assets.posttrain.job import TrlRunSpec, run
from llm_assets.worker import end_with_torchrun


def main() -> None:
    end_with_torchrun()
    parser = argparse.ArgumentParser(prog="python -m llm_assets.posttrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON run spec")
    spec = TrlRunSpec.model_validate_json(parser.parse_args().spec.read_text())
    try:
        run(spec)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
