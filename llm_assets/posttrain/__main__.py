"""Command line: one trl stage described by a JSON spec; the torchrun entry point.

    torchrun --nproc_per_node=2 -m llm_assets.posttrain --spec run.json

The spec is a `llm_assets.posttrain.job.TrlRunSpec` as JSON. Launched by a Dagster Pipes client,
rank 0 reports to Dagster; otherwise it prints one JSON line per event ({"event": "log" |
"checkpoint" | "result", ...}).
"""

from __future__ import annotations

from llm_assets.posttrain.job import TrlRunSpec, run
from llm_assets.pretrain.distributed import worker_main


def main() -> None:
    worker_main("python -m llm_assets.posttrain", __doc__, TrlRunSpec.model_validate_json, run)


if __name__ == "__main__":
    main()
