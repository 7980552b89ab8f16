"""Near-duplicate detection end to end: ours vs datasketch vs rensa, on the same documents.

The corpus (``--corpus``): ``stdlib`` (the default), every ``.py`` file of the running Python's
standard library (tests included; real text nobody here wrote, about 31 MB on CPython 3.11), one
document per file, plus planted variants edited from them (dedup_quality.planted_in_real_text: 20 %
of the result, four in five near-duplicates, the others a spliced head of another file); or
``synthetic``, ``--docs`` random pseudo-word documents with planted variants (the tests' generator).
Each side runs from raw text to cluster labels with the default recipe (5-word shingles, 128
permutations, 16 bands × 8 rows, threshold 0.8):

1. ours: minhash_signatures (numpy tokenising and shingle hashing, rensa's RMinHash over the flat
   shingle hashes) + cluster_near_duplicates (LSH banding, candidates kept when their estimated
   Jaccard reaches the threshold, union-find);
2. datasketch: the same word shingles, as byte strings, into MinHash.bulk (permutations shared),
   MinHashLSH(threshold=0.8, num_perm=128, params=(16, 8)) insert and query, and union-find over
   every query result (MinHashLSH does not check the threshold);
3. rensa, as its documentation uses it: the same shingles as strings into RMinHash.from_token_sets,
   RMinHashLSH(0.8, 128, 16) insert_many and query_all, candidates kept when RMinHash.jaccard
   reaches the threshold, union-find.

All are scored against exact shingle Jaccard on every pair within a planted group plus a random
sample of pairs. Each side runs ``--repeat`` times, interleaved, and its fastest run counts: the
machine may be shared, and the fastest run is the one least disturbed.
Usage: python bench/dedup_vs_datasketch.py [--corpus stdlib|synthetic] [--docs 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import rensa
from datasketch import MinHash, MinHashLSH

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.data.dedup import cluster_near_duplicates, minhash_signatures, tokens  # noqa: E402
from llm_assets.data.dedup_quality import (  # noqa: E402
    Corpus,
    Quality,
    evaluate,
    planted_corpus,
    planted_in_real_text,
)
from llm_assets.manifest import DedupRecipe  # noqa: E402

RECIPE = DedupRecipe()


def ours(texts: list[str]) -> np.ndarray:
    signatures = minhash_signatures(texts, num_perm=RECIPE.num_perm, shingle_size=RECIPE.shingle_size, seed=1)
    return cluster_near_duplicates(signatures, bands=RECIPE.bands, rows=RECIPE.rows, threshold=RECIPE.threshold)


def shingle_strings(text: str) -> list[str]:
    """The shingles `ours` hashes, as strings for the libraries to hash themselves."""
    words, k = tokens(text), RECIPE.shingle_size
    if len(words) < k:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + k]) for i in range(len(words) - k + 1)]


def datasketch(texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    stages: dict[str, float] = {}
    stages["shingles"], shingles = timed(lambda: [[s.encode() for s in shingle_strings(t)] for t in texts])
    stages["minhash"], sketches = timed(lambda: MinHash.bulk(shingles, num_perm=RECIPE.num_perm, seed=1))
    stages["lsh + union-find"], labels = timed(lambda: _datasketch_clusters(sketches))
    return labels, stages


def _datasketch_clusters(sketches: list[MinHash]) -> np.ndarray:
    lsh = MinHashLSH(threshold=RECIPE.threshold, num_perm=RECIPE.num_perm, params=(RECIPE.bands, RECIPE.rows))
    for i, sketch in enumerate(sketches):
        lsh.insert(i, sketch)
    return _union_find(len(sketches), ((i, j) for i, sketch in enumerate(sketches) for j in lsh.query(sketch)))


def rensa_pipeline(texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    stages: dict[str, float] = {}
    stages["shingles"], shingles = timed(lambda: [shingle_strings(t) for t in texts])
    stages["minhash"], sketches = timed(lambda: rensa.RMinHash.from_token_sets(shingles, RECIPE.num_perm, 1))
    stages["lsh + verify + union-find"], labels = timed(lambda: _rensa_clusters(sketches, list(map(bool, shingles))))
    return labels, stages


def _rensa_clusters(sketches: list[rensa.RMinHash], has_shingles: list[bool]) -> np.ndarray:
    lsh = rensa.RMinHashLSH(RECIPE.threshold, RECIPE.num_perm, RECIPE.bands)
    lsh.insert_many(sketches)
    links = (
        (i, j)
        for i, found in enumerate(lsh.query_all(sketches))
        for j in found
        # Empty sketches are all alike: documents without shingles are no one's duplicates.
        if i < j and has_shingles[i] and has_shingles[j] and sketches[i].jaccard(sketches[j]) >= RECIPE.threshold
    )
    return _union_find(len(sketches), links)


def _union_find(n: int, links: Iterable[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def stdlib_texts() -> list[str]:
    """Every .py file of the running Python's standard library that decodes as UTF-8, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if not {"site-packages", "dist-packages"} & set(path.parts):
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue  # a handful of test files are deliberately in other encodings
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=["stdlib", "synthetic"], default="stdlib")
    parser.add_argument("--docs", type=int, default=20_000, help="documents of the synthetic corpus")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-pairs", type=int, default=20_000, help="random pairs added to the evaluation")
    args = parser.parse_args()

    def build() -> Corpus:
        if args.corpus == "stdlib":
            return planted_in_real_text(stdlib_texts(), seed=args.seed)
        return planted_corpus(args.docs, seed=args.seed)

    build_s, corpus = timed(build)
    texts = corpus.texts
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    # Warm-ups, outside the timings: imports and first calls of every code path.
    sides = {"ours": lambda: (ours(texts), {}), "datasketch": lambda: datasketch(texts),
             "rensa": lambda: rensa_pipeline(texts)}
    cold_ours_s, _ = timed(lambda: ours(texts[:10]))
    timed(lambda: datasketch(texts[:10]))
    timed(lambda: rensa_pipeline(texts[:10]))

    runs: dict[str, list] = {name: [] for name in sides}
    for _ in range(args.repeat):
        for name, run in sides.items():
            runs[name].append(timed(run))
    fastest = {name: min(r, key=lambda run: run[0]) for name, r in runs.items()}

    def score(labels: np.ndarray) -> Quality:
        return evaluate(
            labels, corpus, threshold=RECIPE.threshold, shingle_size=RECIPE.shingle_size,
            random_pairs=args.random_pairs, seed=args.seed,
        )

    quality = {name: score(labels) for name, (_, (labels, _)) in fastest.items()}
    report(f"corpus {args.corpus}: {len(texts)} documents, {mb:.1f} MB, built in {build_s:.1f} s", [
        ("planted groups", f"{len(corpus.groups)} (an original and its variants)"),
        ("true near-duplicate pairs",
         f"{quality['ours'].true_pairs} (exact Jaccard ≥ {RECIPE.threshold}, among planted and random pairs)"),
        ("recipe", f"{RECIPE.shingle_size}-word shingles, {RECIPE.num_perm} permutations, "
                   f"{RECIPE.bands} bands × {RECIPE.rows} rows, threshold {RECIPE.threshold}"),
    ])
    ours_s = fastest["ours"][0]
    for name, (seconds, (_, stages)) in fastest.items():
        report(name, [
            ("time", f"{seconds:8.2f} s (fastest of {args.repeat})"),
            ("throughput", f"{mb / seconds:8.2f} MB/s  {len(texts) / seconds:10.0f} docs/s"),
            ("recall", f"{quality[name].recall:8.4f}"),
            ("precision", f"{quality[name].precision:8.4f} "
                          f"(of {quality[name].merged} documents merged into another's cluster)"),
            ("ours is faster by", f"{seconds / ours_s:8.2f}x"),
            *((f"stage: {stage}", f"{s:8.2f} s") for stage, s in stages.items()),
        ])
    report("ours, first call in a fresh process", [("10 documents", f"{cold_ours_s:8.2f} s (not timed above)")])


if __name__ == "__main__":
    main()
