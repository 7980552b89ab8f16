"""Decontamination of post-training examples against the eval sets.

:func:`drop_eval_overlap` is strict: one shared word n-gram with an eval text is enough to drop an
example, and so is a prompt too short to have an n-gram whose words occur in order in an eval text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

# The same tokens and hashes as dedup and the contamination report.
from llm_assets.data.dedup import text_shingles, tokens
from llm_assets.posttrain.dataset_schema import DataSetError
from llm_assets.prompts import prompt_content


def _word_counts(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((len(tokens(t)) for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class _EvalGrams:
    """One eval set's gram hashes by gram length, computed on demand, and its short texts."""

    texts: list[str]
    ngram: int
    by_length: dict[int, np.ndarray] = field(default_factory=dict)
    short: dict[int, np.ndarray] = field(default_factory=dict)  # m < ngram → hashes of the texts of m words

    def __post_init__(self) -> None:
        hashes, owners = text_shingles(self.texts, self.ngram)
        self.by_length[self.ngram] = np.unique(hashes)
        # Only a text with one gram can be shorter than n words; count the words of those alone.
        single = np.flatnonzero(np.bincount(owners, minlength=len(self.texts)) == 1)
        candidates = [self.texts[i] for i in single]
        words = _word_counts(candidates)
        for m in np.unique(words[(words > 0) & (words < self.ngram)]).tolist():
            short_texts = [t for t, w in zip(candidates, words) if w == m]
            self.short[m] = np.unique(text_shingles(short_texts, m)[0])

    def grams(self, m: int) -> np.ndarray:
        if m not in self.by_length:
            self.by_length[m] = np.unique(text_shingles(self.texts, m)[0])
        return self.by_length[m]


def drop_eval_overlap(
    frame: pl.DataFrame,
    text_columns: Sequence[str],
    eval_texts: Mapping[str, Sequence[str]],
    ngram: int,
    *,
    whole_text_columns: Sequence[str] = ("prompt",),
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The rows that overlap no eval text, and per eval set how many rows it made drop.

    Texts are compared as lowercase ``\\w+`` words (punctuation and whitespace do not count), the
    prompt format's header lines removed. A row is dropped when any of its ``text_columns`` shares a
    word ``ngram``-gram with an eval text. In ``whole_text_columns`` (the prompt) a text shorter than
    ``ngram`` words has no n-gram, so it is dropped when its words occur in order in an eval text;
    and an eval text shorter than ``ngram`` words drops a row whose text contains its words in
    order. Not for answer columns: a short answer such as "Yes." occurs in any large eval set by
    chance. A row can count for several eval sets.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be at least 1, got {ngram}")
    missing = [c for c in (*text_columns, *whole_text_columns) if c not in frame.columns]
    if missing:
        raise DataSetError(f"drop_eval_overlap: the frame has no column {missing[0]!r} (columns: {frame.columns})")
    counts = {name: 0 for name in eval_texts}
    if frame.is_empty() or not eval_texts:
        return frame, counts
    content = {c: [prompt_content(t) for t in frame[c].to_list()] for c in {*text_columns, *whole_text_columns}}
    hash_parts, owner_parts = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
    for column in text_columns:
        h, o = text_shingles(content[column], ngram)
        hash_parts.append(h)
        owner_parts.append(o)
    hashes, owners = np.concatenate(hash_parts), np.concatenate(owner_parts)
    whole = [(content[c], _word_counts(content[c])) for c in whole_text_columns]
    dropped = np.zeros(frame.height, dtype=bool)
    for name, texts in eval_texts.items():
        index = _EvalGrams(list(texts), ngram)
        hit = np.zeros(frame.height, dtype=bool)
        hit[owners[np.isin(hashes, index.grams(ngram))]] = True
        for texts_of_rows, words in whole:
            for m in np.unique(words[(words > 0) & (words < ngram)]).tolist():
                rows = np.flatnonzero(words == m)
                own, _ = text_shingles([texts_of_rows[i] for i in rows], m)  # one gram each: the whole text
                hit[rows[np.isin(own, index.grams(m))]] = True
            for m, short in index.short.items():
                long_enough = np.flatnonzero(words >= m)
                h, o = text_shingles([texts_of_rows[i] for i in long_enough], m)
                hit[long_enough[o[np.isin(h, short)]]] = True
        counts[name] = int(hit.sum())
        dropped |= hit
    return frame.filter(pl.Series(~dropped)), counts
