"""n-gram contamination between a training split and evaluation sets.

Memory follows the evaluation sets, not the training data: the eval sets' n-gram hashes are held
once, and the training documents stream past them shard by shard, marking which eval n-grams
they contain. An eval document whose n-grams are found in train at ``doc_overlap`` or more is
contaminated; the gate bounds the contaminated fraction of every eval set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm_assets.data.dedup import shingle_hashes
from llm_assets.manifest import ContaminationRecipe


@dataclass
class EvalSetReport:
    name: str
    documents: int
    contaminated: int
    mean_overlap: float
    max_overlap: float
    worst: list[dict] = field(default_factory=list)  # the most overlapping documents, for the UI

    @property
    def contaminated_fraction(self) -> float:
        return self.contaminated / self.documents if self.documents else 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name, "documents": self.documents, "contaminated": self.contaminated,
            "contaminated_fraction": self.contaminated_fraction, "mean_overlap": self.mean_overlap,
            "max_overlap": self.max_overlap, "worst": self.worst,
        }


class _EvalIndex:
    """Every eval document's n-gram hashes, deduplicated into one sorted array with owner lists."""

    def __init__(self, texts: Sequence[str], ngram: int):
        per_doc = [shingle_hashes(t, ngram) for t in texts]
        self.sizes = np.array([len(h) for h in per_doc], dtype=np.int64)
        owners = np.repeat(np.arange(len(per_doc)), self.sizes)
        flat = np.concatenate(per_doc) if per_doc else np.empty(0, dtype=np.uint64)
        self.unique, self.inverse = np.unique(flat, return_inverse=True)
        self.owners = owners
        self.found = np.zeros(len(self.unique), dtype=bool)

    def mark(self, train_hashes: np.ndarray) -> None:
        if len(train_hashes) and len(self.unique):
            self.found |= np.isin(self.unique, train_hashes)

    def overlaps(self) -> np.ndarray:
        hits = np.bincount(self.owners, weights=self.found[self.inverse], minlength=len(self.sizes))
        return np.divide(hits, self.sizes, out=np.zeros(len(self.sizes)), where=self.sizes > 0)


def measure_contamination(
    train_batches: Iterable[Sequence[str]],
    eval_sets: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    recipe: ContaminationRecipe,
) -> list[EvalSetReport]:
    """Reports per eval set; ``eval_sets`` maps name to (document ids, texts)."""
    indexes = {name: _EvalIndex(texts, recipe.ngram) for name, (_, texts) in eval_sets.items()}
    for batch in train_batches:
        hashes = [shingle_hashes(t, recipe.ngram) for t in batch]
        train = np.unique(np.concatenate(hashes)) if hashes else np.empty(0, dtype=np.uint64)
        for index in indexes.values():
            index.mark(train)
    reports = []
    for name, (ids, _) in eval_sets.items():
        overlap = indexes[name].overlaps()
        order = np.argsort(-overlap, kind="stable")[:5]
        reports.append(EvalSetReport(
            name=name,
            documents=len(ids),
            contaminated=int((overlap >= recipe.doc_overlap).sum()),
            mean_overlap=float(overlap.mean()) if len(overlap) else 0.0,
            max_overlap=float(overlap.max()) if len(overlap) else 0.0,
            worst=[{"id": ids[i], "overlap": round(float(overlap[i]), 4)} for i in order if overlap[i] > 0],
        ))
    return reports
