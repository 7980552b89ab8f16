"""Measuring near-duplicate detection: corpora with planted near-duplicates (and look-alikes that
must not be merged), synthetic or edited from real text, and a clustering's pair recall and
precision against exact Jaccard on word shingles. The dedup tests assert on these figures and
bench/dedup_vs_datasketch.py reports them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from llm_assets.data.dedup import shingle_hashes

ALPHABET = list("abcdefghijklmnopqrstuvwxyzéüß")


@dataclass
class Corpus:
    texts: list[str]
    groups: list[list[int]]  # an original and its planted variants, as indices into texts


class Writer:
    """Random documents of pseudo-words, kept as sentences of word ids so they can be edited."""

    def __init__(self, rng: np.random.Generator, vocabulary_size: int = 4000) -> None:
        self.rng = rng
        words: set[str] = set()
        while len(words) < vocabulary_size:
            words.add("".join(rng.choice(ALPHABET, int(rng.integers(2, 11)))))
        self.words = sorted(words)  # sorted: set order changes with PYTHONHASHSEED

    def document(self, n_words: int) -> list[list[int]]:
        ids = self.rng.integers(0, len(self.words), n_words).tolist()
        cuts = np.cumsum(self.rng.integers(6, 19, n_words // 6 + 1))
        return [ids[lo:hi] for lo, hi in itertools.pairwise([0, *cuts[cuts < n_words].tolist(), n_words])]

    def render(self, sentences: list[list[int]]) -> str:
        return " ".join(
            " ".join([self.words[s[0]].capitalize(), *(self.words[w] for w in s[1:])]) + "." for s in sentences if s
        )

    def variant(self, doc: list[list[int]]) -> list[list[int]]:
        """A near-duplicate whose shingle Jaccard with ``doc`` is about 0.85–1 (for 5-shingles)."""
        doc = [list(s) for s in doc]
        n = sum(map(len, doc))
        kind = self.rng.choice(["copy", "edit", "swap", "truncate"], p=[0.1, 0.5, 0.2, 0.2])
        if kind == "swap" and n >= 160:
            # Two adjacent sentences change places: at most 3 × 4 shingles cross the new seams.
            i = int(self.rng.integers(len(doc) - 1))
            doc[i], doc[i + 1] = doc[i + 1], doc[i]
        elif kind == "truncate":
            for _ in range(int(self.rng.integers(3, max(4, n // 12)))):
                doc[-1].pop()
                if not doc[-1]:
                    doc.pop()
        elif kind in ("edit", "swap"):
            # Each replaced, deleted or inserted word touches at most 5 shingles: J ≥ (n−5e)/(n+5e).
            for _ in range(int(self.rng.integers(1, max(1, n // 70) + 1))):
                sentence = doc[int(self.rng.integers(len(doc)))]
                i, op = int(self.rng.integers(len(sentence))), self.rng.integers(3)
                if op == 0:
                    sentence[i] = int(self.rng.integers(len(self.words)))
                elif op == 1 and len(sentence) > 1:
                    del sentence[i]
                else:
                    sentence.insert(i, int(self.rng.integers(len(self.words))))
        return doc

    def related(self, doc: list[list[int]], kept: float) -> list[list[int]]:
        """Shares its first ``kept`` of ``doc``'s words, then goes on differently: a Jaccard of about
        kept / (2 − kept), well below the threshold (a template, a shared preamble)."""
        n = sum(map(len, doc))
        head = list(itertools.chain.from_iterable(doc))[: int(n * kept)]
        return [head, *self.document(n - len(head))]


def planted_corpus(n_docs: int, seed: int, variant_share: float = 0.2) -> Corpus:
    """``n_docs`` documents of 80–300 words, shuffled: distinct random ones (pairwise Jaccard about
    0) and ``variant_share`` of variants of them. Four in five variants are near-duplicates (small
    edits, two sentences swapped, a few words cut off the end, or exact copies), the others only
    share a head of 50–80 % of the words (Jaccard 0.33–0.67): LSH proposes many of those, and
    merging them is a mistake."""
    rng = np.random.default_rng(seed)
    writer = Writer(rng)
    n_variants = round(n_docs * variant_share)
    originals = [writer.document(int(rng.integers(80, 301))) for _ in range(n_docs - n_variants)]
    parents = rng.integers(0, len(originals), n_variants)
    variants = [
        writer.variant(originals[p]) if rng.random() < 0.8 else writer.related(originals[p], rng.uniform(0.5, 0.8))
        for p in parents
    ]
    return _shuffled([writer.render(d) for d in originals + variants], parents, rng)


def planted_in_real_text(texts: list[str], seed: int, variant_share: float = 0.2) -> Corpus:
    """``texts`` (real documents, say source files) plus ``variant_share`` of the result as planted
    variants, shuffled. As in :func:`planted_corpus`, four in five variants are near-duplicates (a
    few words replaced, deleted or inserted, two adjacent lines swapped, the end cut off, or an
    exact copy), the others keep a head of 50–80 % of the words and continue with another text."""
    rng = np.random.default_rng(seed)
    n_variants = round(len(texts) * variant_share / (1 - variant_share))
    parents = rng.integers(0, len(texts), n_variants)
    variants = [
        _edited(texts[p], rng) if rng.random() < 0.8
        else _spliced(texts[p], texts[int(rng.integers(len(texts)))], rng.uniform(0.5, 0.8))
        for p in parents
    ]
    return _shuffled([*texts, *variants], parents, rng)


def _edited(text: str, rng: np.random.Generator) -> str:
    """A near-duplicate of a real text: edits on its whitespace-separated words or lines."""
    kind = rng.choice(["copy", "edit", "swap", "truncate"], p=[0.1, 0.5, 0.2, 0.2])
    lines = text.split("\n")
    if kind == "swap" and len(lines) >= 40:
        i = int(rng.integers(len(lines) - 1))
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return "\n".join(lines)
    pieces = re.split(r"(\s+)", text)  # words at even positions, the whitespace between at odd ones
    n = (len(pieces) + 1) // 2
    if kind == "truncate":
        return "".join(pieces[: 2 * max(1, n - int(rng.integers(3, max(4, n // 12))))])
    if kind in ("edit", "swap"):
        for _ in range(int(rng.integers(1, max(1, n // 70) + 1))):
            i, other, op = 2 * int(rng.integers(n)), pieces[2 * int(rng.integers(n))], rng.integers(3)
            pieces[i] = other if op == 0 else "" if op == 1 else f"{pieces[i]} {other}"
    return "".join(pieces)


def _spliced(text: str, other: str, kept: float) -> str:
    """The first ``kept`` of ``text``'s characters, then ``other`` from the same point on."""
    cut = int(len(text) * kept)
    return text[:cut] + other[cut:] if len(other) > cut else text[:cut] + other


def _shuffled(docs: list[str], parents: np.ndarray, rng: np.random.Generator) -> Corpus:
    """The originals (the first ``len(docs) − len(parents)``) and their variants (the rest, one per
    entry of ``parents``), shuffled, with the groups of an original and its variants."""
    n_originals = len(docs) - len(parents)
    order = rng.permutation(len(docs))
    position = np.argsort(order)
    family: dict[int, list[int]] = {}
    for variant, parent in enumerate(parents.tolist(), start=n_originals):
        family.setdefault(parent, [int(position[parent])]).append(int(position[variant]))
    return Corpus([docs[i] for i in order], [sorted(g) for g in family.values()])


@dataclass
class Quality:
    """``recall``: of the evaluated pairs with exact Jaccard ≥ threshold, the share put in one
    cluster. ``precision``: of the documents merged into another's cluster, the share whose exact
    Jaccard with the cluster's representative (its smallest member) is ≥ threshold − tolerance."""

    recall: float
    precision: float
    true_pairs: int
    merged: int


def evaluate(
    labels: np.ndarray, corpus: Corpus, *, threshold: float, shingle_size: int, random_pairs: int, seed: int,
    tolerance: float = 0.1,
) -> Quality:
    """Recall and precision of a clustering against exact Jaccard on every pair within a planted
    group plus ``random_pairs`` random pairs."""
    rng = np.random.default_rng(seed)
    n = len(corpus.texts)
    pairs = {pair for group in corpus.groups for pair in itertools.combinations(group, 2)}
    pairs |= {tuple(sorted(p)) for p in rng.integers(0, n, (random_pairs, 2)).tolist() if p[0] != p[1]}
    sets: dict[int, np.ndarray] = {}

    def exact(i: int, j: int) -> float:
        for d in (i, j):
            if d not in sets:
                sets[d] = shingle_hashes(corpus.texts[d], shingle_size)
        union = len(np.union1d(sets[i], sets[j]))
        return len(np.intersect1d(sets[i], sets[j], assume_unique=True)) / union if union else 0.0

    true = [(i, j) for i, j in sorted(pairs) if exact(i, j) >= threshold]
    found = sum(labels[i] == labels[j] for i, j in true)
    merged = np.flatnonzero(labels != np.arange(n))
    right = sum(exact(int(labels[d]), int(d)) >= threshold - tolerance for d in merged)
    return Quality(
        recall=float(found / len(true)) if true else 1.0,
        precision=float(right / len(merged)) if len(merged) else 1.0,
        true_pairs=len(true),
        merged=len(merged),
    )
