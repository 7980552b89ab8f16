"""Word n-gram overlap between training text and evaluation sets: the one measure behind the
contamination gates (over the training split) and the decontamination of post-training examples.

Texts are compared as lowercase ``\\w+`` words (:func:`~llm_assets.data.dedup.tokens`), hashed as
in dedup. An eval text is the set of its word n-grams. A text of fewer than n words has none, so
it would never be found: one of ``min_words`` words or more is instead its whole word sequence,
looked for as an m-gram (m its length) in the training text; shorter texts ("Return self.",
"Yes.") occur in any large corpus by chance and are never contaminated.

Memory follows the evaluation sets, not the training data: every eval set's gram hashes are held
once, in one index, and the training documents stream past them batch by batch (each batch hashed
once per gram length), marking which eval grams they contain and the first training document that
did. An eval document whose grams are found in train at ``doc_overlap`` or more is contaminated;
the gates bound the contaminated fraction of every eval set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm_assets.data.dedup import text_shingles, tokens
from llm_assets.manifest import ContaminationRecipe

TOP_DOCUMENTS = 5  # eval documents listed per set, and training documents per eval document
LISTED_CONTAMINATED = 20  # contaminated eval documents listed per set (all are counted)


class EvalGrams:
    """The distinct gram hashes of eval texts, numbered, and which text holds which gram.

    ``doc_of[i]`` holds gram ``gram_of[i]`` (each pair once); ``sizes[d]`` is the number of
    distinct grams of text ``d`` (0 for a text too short to have one).
    """

    def __init__(self, texts: Sequence[str], ngram: int, min_words: int):
        if ngram < 1 or min_words < 1:
            raise ValueError(f"ngram and min_words must be at least 1, got {ngram} and {min_words}")
        words = np.fromiter((len(tokens(t)) for t in texts), dtype=np.int64, count=len(texts))
        short = np.unique(words[(words >= min_words) & (words < ngram)]).tolist()
        self.lengths = [ngram, *short]
        self._tables: list[np.ndarray] = []
        self._offsets: list[int] = []
        docs_parts, grams_parts, offset = [np.empty(0, np.int64)], [np.empty(0, np.int64)], 0
        for length in self.lengths:
            docs = np.flatnonzero(words >= ngram if length == ngram else words == length)
            hashes, owners = text_shingles([texts[i] for i in docs], length)
            table = np.unique(hashes)
            self._tables.append(table)
            self._offsets.append(offset)
            docs_parts.append(docs[owners])
            grams_parts.append(offset + np.searchsorted(table, hashes))
            offset += len(table)
        self.grams = offset
        pairs = np.unique(np.stack([np.concatenate(docs_parts), np.concatenate(grams_parts)]), axis=1)
        self.doc_of, self.gram_of = pairs[0], pairs[1]
        self.sizes = np.bincount(self.doc_of, minlength=len(texts))

    def matches(self, texts: Sequence[str], *, whole_short_texts: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(row, gram) pairs, repeats kept: ``texts[row]`` contains eval gram ``gram``. Without
        ``whole_short_texts`` only the n-grams are looked for, not the short eval texts."""
        rows, grams = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for length, table, offset in zip(self.lengths, self._tables, self._offsets):
            if not len(table) or (length != self.lengths[0] and not whole_short_texts):
                continue
            # A text shorter than `length` hashes to one padded shingle, equal to no real gram.
            hashes, owners = text_shingles(texts, length)
            position = np.searchsorted(table, hashes).clip(max=len(table) - 1)
            hit = table[position] == hashes
            rows.append(owners[hit])
            grams.append(offset + position[hit])
        return np.concatenate(rows), np.concatenate(grams)


@dataclass
class EvalSetReport:
    name: str
    documents: int
    contaminated: int
    mean_overlap: float
    max_overlap: float
    worst: list[dict] = field(default_factory=list)  # the most overlapping documents, for the UI
    # Each contaminated document (at most LISTED_CONTAMINATED): id, overlap, and the training
    # documents that hold its grams, most grams first.
    contaminated_documents: list[dict] = field(default_factory=list)
    contaminated_ids: list[str] = field(default_factory=list)  # every contaminated document

    @property
    def contaminated_fraction(self) -> float:
        return self.contaminated / self.documents if self.documents else 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name, "documents": self.documents, "contaminated": self.contaminated,
            "contaminated_fraction": self.contaminated_fraction, "mean_overlap": self.mean_overlap,
            "max_overlap": self.max_overlap, "worst": self.worst,
            "contaminated_documents": self.contaminated_documents,
        }


def measure_contamination(
    train_batches: Iterable[tuple[Sequence[str], Sequence[str]]],
    eval_sets: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    recipe: ContaminationRecipe,
) -> list[EvalSetReport]:
    """Reports per eval set; ``train_batches`` yields (document ids, texts) of the training data,
    ``eval_sets`` maps a name to (document ids, texts)."""
    names = list(eval_sets)
    texts = [text for name in names for text in eval_sets[name][1]]
    ids = [doc_id for name in names for doc_id in eval_sets[name][0]]
    index = EvalGrams(texts, recipe.ngram, recipe.min_words)
    found = np.zeros(index.grams, dtype=bool)
    finder = np.full(index.grams, None, dtype=object)  # the first training document holding each gram
    for batch_ids, batch_texts in train_batches:
        rows, grams = index.matches(batch_texts)
        new = ~found[grams]
        finder[grams[new]] = np.asarray(batch_ids, dtype=object)[rows[new]]
        found[grams] = True
    hits = np.bincount(index.doc_of, weights=found[index.gram_of], minlength=len(texts))
    overlap = np.divide(hits, index.sizes, out=np.zeros(len(texts)), where=index.sizes > 0)
    reports, start = [], 0
    for name in names:
        end = start + len(eval_sets[name][0])
        own = overlap[start:end]
        order = np.argsort(-own, kind="stable")
        dirty = [start + i for i in order if own[i] >= recipe.doc_overlap]
        reports.append(EvalSetReport(
            name=name,
            documents=end - start,
            contaminated=len(dirty),
            mean_overlap=float(own.mean()) if len(own) else 0.0,
            max_overlap=float(own.max()) if len(own) else 0.0,
            worst=[{"id": ids[start + i], "overlap": round(float(own[i]), 4)}
                   for i in order[:TOP_DOCUMENTS] if own[i] > 0],
            contaminated_documents=[
                {"id": ids[d], "overlap": round(float(overlap[d]), 4),
                 "training_documents": _holders(index, found, finder, d)}
                for d in dirty[:LISTED_CONTAMINATED]
            ],
            contaminated_ids=[ids[d] for d in dirty],
        ))
        start = end
    return reports


def _holders(index: EvalGrams, found: np.ndarray, finder: np.ndarray, doc: int) -> list[str]:
    grams = index.gram_of[index.doc_of == doc]
    counts = Counter(finder[grams[found[grams]]].tolist())
    return [doc_id for doc_id, _ in counts.most_common(TOP_DOCUMENTS)]
