"""The SFT and preference data sets: read from user JSONL files and/or derived from the corpus.

Pure functions over polars frames, no Dagster; the assets wrap them. :func:`build_sft_dataset` and
:func:`build_preference_dataset` assemble the examples of :mod:`~llm_assets.posttrain.user_files`
and :mod:`~llm_assets.posttrain.derived` into train and val splits: deduplicated by prompt,
decontaminated by :mod:`~llm_assets.posttrain.decontaminate`, capped. The rows are described in
:mod:`~llm_assets.posttrain.dataset_schema`, the prompt format in :mod:`llm_assets.prompts`, the
files written in :mod:`~llm_assets.posttrain.dataset_files`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm_assets.manifest import PosttrainDataRecipe
from llm_assets.posttrain.dataset_schema import PREFERENCE_COLUMNS, SFT_COLUMNS, DataSetError, SplitDataSet
from llm_assets.posttrain.decontaminate import drop_eval_overlap
from llm_assets.posttrain.derived import derive_preference_pairs, derive_sft_examples, docstring_rows, sha256_int
from llm_assets.posttrain.user_files import read_preference_jsonl, read_sft_jsonl

_VAL_SALT = "llm-assets/posttrain/val"
_CAP_SALT = "llm-assets/posttrain/cap"


def _in_val(prompt: str, val_fraction: float) -> bool:
    return sha256_int(f"{_VAL_SALT}\x00{prompt}") / 2**64 < val_fraction


def _cap(frame: pl.DataFrame, limit: int) -> pl.DataFrame:
    """At most ``limit`` rows, chosen by a hash of the prompt so the choice does not depend on the
    order or number of the others; the kept rows stay in their order."""
    if frame.height <= limit:
        return frame
    ranks = np.array([sha256_int(f"{_CAP_SALT}\x00{p}") for p in frame["prompt"].to_list()], dtype=np.uint64)
    keep = np.zeros(frame.height, dtype=bool)
    keep[np.argsort(ranks, kind="stable")[:limit]] = True
    return frame.filter(pl.Series(keep))


def _assemble(
    what: str,
    columns: tuple[str, ...],
    derived: tuple[pl.DataFrame, pl.DataFrame] | None,
    derived_stats: dict,
    file_frames: list[tuple[Path, pl.DataFrame]],
    files_field: str,
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
) -> SplitDataSet:
    empty = pl.DataFrame(schema=dict.fromkeys(columns, pl.String))
    train_parts, val_parts = ([derived[0]], [derived[1]]) if derived else ([], [])
    per_file: dict[str, dict[str, int]] = {}
    for path, frame in file_frames:
        to_val = pl.Series([_in_val(p, recipe.val_fraction) for p in frame["prompt"].to_list()], dtype=pl.Boolean)
        train_parts.append(frame.filter(~to_val))
        val_parts.append(frame.filter(to_val))
        counts = per_file.setdefault(path.name, {"train": 0, "val": 0})
        counts["train"] += train_parts[-1].height
        counts["val"] += val_parts[-1].height
    stats: dict[str, Any] = {**derived_stats, "files": per_file, "duplicates_removed": {}, "capped": {}}
    splits = {}
    for split, parts in (("val", val_parts), ("train", train_parts)):
        frame = pl.concat([empty, *parts])
        unique = frame.unique("prompt", keep="first", maintain_order=True)
        stats["duplicates_removed"][split] = frame.height - unique.height
        splits[split] = unique
    # A prompt in val too would be trained on and then measured on; val keeps it.
    before = splits["train"].height
    splits["train"] = splits["train"].filter(~pl.col("prompt").is_in(splits["val"]["prompt"].implode()))
    stats["train_prompts_in_val"] = before - splits["train"].height
    # Only train is decontaminated: val is never trained on, and the derived val examples come from
    # the corpus val split, which the caller may list among the eval texts itself.
    before = splits["train"].height
    answer_columns = [c for c in columns if c not in ("id", "source")]
    splits["train"], stats["dropped_overlap"] = drop_eval_overlap(
        splits["train"], answer_columns, eval_texts, recipe.ngram
    )
    stats["dropped_overlap_total"] = before - splits["train"].height
    for split in ("train", "val"):
        capped = _cap(splits[split], recipe.max_examples)
        stats["capped"][split] = splits[split].height - capped.height
        splits[split] = capped
        stats[split] = capped.height
    for split in ("train", "val"):
        if splits[split].is_empty():
            raise DataSetError(_why_empty(what, split, stats, recipe, files_field))
    return SplitDataSet(train=splits["train"], val=splits["val"], stats=stats)


def _why_empty(what: str, split: str, stats: dict, recipe: PosttrainDataRecipe, files_field: str) -> str:
    from_files = sum(c[split] for c in stats["files"].values())
    head = f"the {what} data set has no {split} examples"
    if not recipe.derive_from_corpus and not stats["files"]:
        return (
            f"{head}: derive_from_corpus is false and {files_field} is empty; add a JSONL file to {files_field} "
            "or set derive_from_corpus: true"
        )
    if recipe.derive_from_corpus and not stats["derived"][split] and not from_files:
        docs = stats["docstring_documents"][split]
        reason = (
            f"the corpus {split} split has no docstring documents (kind=docstring)" if not docs
            else f"none of the {docs} docstring documents of the corpus {split} split gave an example"
            + (" (a preference pair needs a same-module sibling of comparable length or a fact to change)"
               if what == "preference" else "")
        )
        where = (
            f" and the files of {files_field} gave none to {split} (by val_fraction {recipe.val_fraction})"
            if stats["files"] else f" and {files_field} is empty"
        )
        return (
            f"{head}: {reason}{where}; add examples in a JSONL file to {files_field} in the manifest, "
            "or use a python_stdlib source"
        )
    if split == "val" and not from_files and not stats["derived"]["val"]:
        return (
            f"{head}: no file example fell in val (val_fraction {recipe.val_fraction}) and none was derived from the "
            f"corpus val split; add examples to {files_field} or raise stages.posttrain_data.val_fraction"
        )
    return (
        f"{head}: every candidate was removed (duplicates: {stats['duplicates_removed'][split]}, "
        f"dropped for overlap with eval sets: {stats['dropped_overlap'] if split == 'train' else 'not applied'}, "
        f"also in val: {stats['train_prompts_in_val'] if split == 'train' else 0}); check "
        "stages.contamination.eval_sets or raise stages.posttrain_data.ngram, or add examples"
    )


def _derive_splits(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    recipe: PosttrainDataRecipe,
    derive: Callable[[pl.DataFrame], pl.DataFrame],
) -> tuple[tuple[pl.DataFrame, pl.DataFrame] | None, dict]:
    """Derived (train, val) examples, each from its own docstrings only, so neither a val question
    nor a val answer (as a rejected one) reaches training. Val takes the val split's docstrings and
    ``val_fraction`` of the train split's (by a salted hash of the id): a corpus's val split alone
    is often too small to measure a reward model on."""
    if not recipe.derive_from_corpus:
        zero = {"train": 0, "val": 0}
        return None, {"docstring_documents": zero, "derived": zero, "derived_skipped": zero}
    train_docs = docstring_rows(train_frames)
    held = pl.Series([_in_val(i, recipe.val_fraction) for i in train_docs["id"].to_list()], dtype=pl.Boolean)
    docs = {"train": train_docs.filter(~held),
            "val": pl.concat([docstring_rows([val_frame]), train_docs.filter(held)]).sort("id")}
    frames = {split: derive(d) for split, d in docs.items()}
    return (frames["train"], frames["val"]), {
        "docstring_documents": {split: d.height for split, d in docs.items()},
        "derived": {split: f.height for split, f in frames.items()},
        "derived_skipped": {split: docs[split].height - frames[split].height for split in docs},
    }


def build_sft_dataset(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    user_files: Sequence[Path | str],
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
) -> SplitDataSet:
    """The SFT data set: derived examples (train from the train split's docstrings, val from the val
    split's and a held-out fraction of the train split's) and user files (split by a salted hash of the prompt),
    deduplicated by prompt, decontaminated, capped. Raises DataSetError, saying why, when train or val would be
    empty."""
    files = [(Path(p), read_sft_jsonl(p)) for p in user_files]
    derived, stats = _derive_splits(
        train_frames, val_frame, recipe, lambda docs: derive_sft_examples(docs, recipe.max_answer_chars)
    )
    return _assemble("SFT", SFT_COLUMNS, derived, stats, files, "stages.posttrain_data.sft_files", recipe, eval_texts)


def build_preference_dataset(
    train_frames: Iterable[pl.DataFrame],
    val_frame: pl.DataFrame,
    user_files: Sequence[Path | str],
    recipe: PosttrainDataRecipe,
    eval_texts: Mapping[str, Sequence[str]],
    seed: int,
) -> SplitDataSet:
    """The preference data set, assembled as :func:`build_sft_dataset`; derived pairs take their
    rejected answers from the same split only."""
    files = [(Path(p), read_preference_jsonl(p)) for p in user_files]
    derived, stats = _derive_splits(
        train_frames, val_frame, recipe,
        lambda docs: derive_preference_pairs(docs, recipe.max_answer_chars, seed, recipe.rejected_from),
    )
    return _assemble(
        "preference", PREFERENCE_COLUMNS, derived, stats, files, "stages.posttrain_data.preference_files",
        recipe, eval_texts,
    )
