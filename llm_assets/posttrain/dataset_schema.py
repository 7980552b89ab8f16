"""The shape of the post-training data sets: their row columns, the train/val pair, their error.

SFT rows are ``{"id", "source", "prompt", "completion"}`` and preference rows
``{"id", "source", "prompt", "chosen", "rejected"}``, all plain strings: the prompt-completion
format of trl's SFTTrainer and the explicit-prompt preference format of DPOTrainer and
RewardTrainer. ``id`` and ``source`` are provenance: ``stdlib:json/decoder.py::JSONDecoder.decode``
and ``corpus:stdlib`` for an example derived from a docstring, ``sft.jsonl:17`` and ``file:sft.jsonl``
for line 17 of a user file (the file's name only, so ids do not depend on the machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

SFT_COLUMNS = ("id", "source", "prompt", "completion")
PREFERENCE_COLUMNS = ("id", "source", "prompt", "chosen", "rejected")


class DataSetError(ValueError):
    """A post-training data set cannot be built; the message names the file, line, field and fix."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass(frozen=True)
class SplitDataSet:
    """One data set's train and val rows, and the counts that explain how they came to be."""

    train: pl.DataFrame
    val: pl.DataFrame
    stats: dict = field(default_factory=dict)
