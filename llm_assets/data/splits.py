"""Deterministic train/val/test splits by hash.

A document's split is a pure function of its group key (the document id, or its source file: the
URI before '#', so a module and its docstrings land together) and the recipe's salt: the same
document falls in the same split on every machine and in every run, and never in two.
"""

from __future__ import annotations

import hashlib

import polars as pl

from llm_assets.manifest import SplitRecipe

SPLITS = ("train", "val", "test")


def group_key(doc_id: str, uri: str, recipe: SplitRecipe) -> str:
    return doc_id if recipe.group_by == "document" else uri.split("#", 1)[0]


def split_of(key: str, recipe: SplitRecipe) -> str:
    """The split of a group key: its salted sha256, read as a number in [0, 1), against the ratios."""
    digest = hashlib.sha256(f"{recipe.salt}\x00{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if point < recipe.train:
        return "train"
    if point < recipe.train + recipe.val:
        return "val"
    return "test"


def assign_splits(frame: pl.DataFrame, recipe: SplitRecipe) -> pl.DataFrame:
    """The frame with a ``split`` column."""
    splits = [
        split_of(group_key(doc_id, uri, recipe), recipe)
        for doc_id, uri in zip(frame["id"].to_list(), frame["uri"].to_list())
    ]
    return frame.with_columns(pl.Series("split", splits, dtype=pl.Enum(SPLITS)))
