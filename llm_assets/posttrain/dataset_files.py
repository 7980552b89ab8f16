"""The files of a post-training data set artifact: ``train.jsonl`` and ``val.jsonl``, written and read.

:func:`write_dataset` writes a :class:`~llm_assets.posttrain.dataset_schema.SplitDataSet` and
returns the asset's metadata; :func:`read_dataset` gives the rows back to the training stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from llm_assets.jsonl import read_written_jsonl
from llm_assets.posttrain.dataset_schema import DataSetError, SplitDataSet
from llm_assets.prompts import prompt_content

TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"


def _jsonl_bytes(frame: pl.DataFrame) -> bytes:
    return "".join(
        json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in frame.iter_rows(named=True)
    ).encode("utf-8")


def _cell(text: str, limit: int = 100) -> str:
    flat = " ".join(prompt_content(text).split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|")


def write_dataset(ds: SplitDataSet, out_dir: Path | str) -> dict:
    """Write ``train.jsonl`` and ``val.jsonl`` (UTF-8, one object per line, sorted keys: readable, and
    loadable by ``datasets.load_dataset("json", ...)``); returns metadata for the asset: row
    counts, mean lengths in characters, and a markdown table of the first train examples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRAIN_FILE).write_bytes(_jsonl_bytes(ds.train))
    (out_dir / VAL_FILE).write_bytes(_jsonl_bytes(ds.val))
    text_columns = [c for c in ds.train.columns if c not in ("id", "source")]
    both = pl.concat([ds.train, ds.val])
    metadata: dict[str, Any] = {"train_examples": ds.train.height, "val_examples": ds.val.height}
    for column in text_columns:
        mean = both[column].str.len_chars().mean() if both.height else 0.0
        metadata[f"mean_{column}_chars"] = round(float(mean or 0.0), 1)
    header = "| " + " | ".join(text_columns) + " |\n|" + "---|" * len(text_columns) + "\n"
    rows = "\n".join(
        "| " + " | ".join(_cell(row[c]) for c in text_columns) + " |" for row in ds.train.head(3).iter_rows(named=True)
    )
    metadata["preview_markdown"] = header + rows
    return metadata


def read_dataset(directory: Path | str) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a directory written by :func:`write_dataset`."""
    directory = Path(directory)
    missing = f"the data set directory must hold {TRAIN_FILE} and {VAL_FILE} (rematerialize it)"
    splits = [read_written_jsonl(directory / name, DataSetError, missing, "rematerialize it")
              for name in (TRAIN_FILE, VAL_FILE)]
    return splits[0], splits[1]
