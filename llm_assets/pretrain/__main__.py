"""Command line: one training job described by a JSON spec; also the torchrun entry point.

    python -m llm_assets.pretrain --spec run.json
    torchrun --nproc_per_node=8 -m llm_assets.pretrain --spec run.json

The spec is a `llm_assets.pretrain.job.RunSpec` as JSON. Launched by a Dagster Pipes client, rank 0
reports to Dagster; otherwise it prints one JSON line per event ({"event": "step" | "checkpoint" |
"resume" | "result", ...}).
"""

from __future__ import annotations

from llm_assets.pretrain.distributed import worker_main
from llm_assets.pretrain.job import RunSpec, run


def main() -> None:
    worker_main("python -m llm_assets.pretrain", __doc__, RunSpec.model_validate_json, run)


if __name__ == "__main__":
    main()
