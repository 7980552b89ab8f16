"""What the loop's fine-tune trains on, from feedback_dataset's files: pure functions, no Dagster.

Every feedback example with a good answer is an SFT row: a liked answer as it was, a correction as
the answer it should have been. The corrections are also preference pairs (the correction over the
model's answer) for the optional DPO. A share of each is held out (chosen by the example's id hash,
so the split does not move when examples are added) for the val figures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl


class NotEnoughFeedback(ValueError):
    """Too few examples to fine-tune on and hold one out."""


@dataclass(frozen=True)
class FeedbackExamples:
    sft_train: list[dict[str, str]]
    sft_val: list[dict[str, str]]
    pairs_train: list[dict[str, str]]
    pairs_val: list[dict[str, str]]


def _held_out(ids: list[str], fraction: float) -> set[str]:
    """The ids held out: those whose hash falls under `fraction`; at least one, never all."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    share = {i for i in ids if int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) / 2**32 < fraction}
    if not share and ranked:
        share = {ranked[0]}
    return share if len(share) < len(ids) else set(ranked[:1])


def _split(frame: pl.DataFrame, columns: list[str], fraction: float) -> tuple[list[dict], list[dict]]:
    held = _held_out(frame["id"].to_list(), fraction)
    rows = frame.select("id", *columns).to_dicts()
    return ([{c: r[c] for c in columns} for r in rows if r["id"] not in held],
            [{c: r[c] for c in columns} for r in rows if r["id"] in held])


def feedback_examples(sft: pl.DataFrame, preferences: pl.DataFrame, val_fraction: float,
                      where: str) -> FeedbackExamples:
    """SFT rows (liked answers and corrections) and preference pairs, each split into train and val.
    `where` names the data in the error when there is too little of it."""
    corrected = preferences.select("id", "prompt", pl.col("chosen").alias("completion"))
    examples = pl.concat([sft.select("id", "prompt", "completion"), corrected])
    if examples.height < 2:
        raise NotEnoughFeedback(
            f"{where} holds {examples.height} usable example(s) (liked answers and corrections); the fine-tune "
            "needs at least 2, one to train on and one held out. Wait for more feedback: the loop runs again when "
            "new traffic is judged")
    sft_train, sft_val = _split(examples, ["prompt", "completion"], val_fraction)
    pairs_train, pairs_val = (_split(preferences, ["prompt", "chosen", "rejected"], val_fraction)
                              if preferences.height >= 2 else ([], []))
    return FeedbackExamples(sft_train, sft_val, pairs_train, pairs_val)
