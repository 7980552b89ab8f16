"""Decontamination of post-training examples against the eval sets.

:func:`drop_eval_overlap` is strict: one shared word n-gram with an eval text is enough to drop an
example, and so is a prompt too short to have an n-gram whose words occur in order in an eval text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

# The same words, hashes and eval index as the contamination gates.
from llm_assets.data.contamination import EvalGrams
from llm_assets.data.dedup import text_shingles, tokens
from llm_assets.posttrain.dataset_schema import DataSetError
from llm_assets.prompts import prompt_content


def _word_counts(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((len(tokens(t)) for t in texts), dtype=np.int64, count=len(texts))


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
    whole_words = {c: _word_counts(content[c]) for c in whole_text_columns}
    dropped = np.zeros(frame.height, dtype=bool)
    for name, texts in eval_texts.items():
        texts = list(texts)
        # min_words=1: in a prompt, even a one-word eval text found whole is overlap.
        index = EvalGrams(texts, ngram, min_words=1)
        hit = np.zeros(frame.height, dtype=bool)
        for column in text_columns:
            hit[index.matches(content[column], whole_short_texts=False)[0]] = True
        for column in whole_text_columns:
            hit[index.matches(content[column])[0]] = True
            words = whole_words[column]
            for m in np.unique(words[(words > 0) & (words < ngram)]).tolist():
                rows = np.flatnonzero(words == m)
                own, _ = text_shingles([content[column][i] for i in rows], m)  # one gram each: the whole text
                hit[rows[np.isin(own, text_shingles(texts, m)[0])]] = True
        counts[name] = int(hit.sum())
        dropped |= hit
    return frame.filter(pl.Series(~dropped)), counts
