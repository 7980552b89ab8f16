"""Near-duplicate detection: MinHash signatures, LSH banding and union-find clustering.

Pure functions over numpy arrays, no Dagster; the assets wrap them.

Method. A document is the set of its word k-shingles (k consecutive lowercase ``\\w+`` tokens),
each hashed to 64 bits. The Jaccard similarity of two such sets is estimated by MinHash: for each of
``num_perm`` seeded hash functions a document keeps the minimum over its shingles, and two documents
agree at a position with probability equal to their Jaccard similarity. Locality-sensitive hashing
then cuts each signature into ``bands`` bands of ``rows`` rows; documents identical in at least one
band become candidate pairs (probability ``1 − (1 − J^rows)^bands``, an S-curve around the
threshold), candidates are kept when their estimated Jaccard reaches the threshold, and the kept
pairs are joined into clusters with union-find. Exact copies are handled separately, by content hash.

Tokenising and shingle hashing are vectorised with numpy over the code points of a whole batch of
texts at once. The MinHash itself is rensa's ``RMinHash`` (Rust), fed the flat array of shingle
hashes with one offset per document: it sketches in a few hundredths of a second what took a
per-permutation numpy loop over a second (``bench/dedup_vs_datasketch.py``). Token and shingle hashes
are fixed arithmetic on code points and rensa derives its permutations from the seed alone, so
signatures are the same on every machine and in every process (unlike Python's ``hash()``);
``MINHASH_ALGORITHM`` names rensa's algorithm version, which the signatures' fingerprint includes.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import rensa

if TYPE_CHECKING:
    from llm_assets.data.engine import DataEngine

MINHASH_ALGORITHM = f"rensa.RMinHash v{rensa.RMinHash.ALGORITHM_VERSION}"

_WORD = re.compile(r"\w+")
_IRREGULAR_CASE = "\u0130\u03a3"  # İ lowercases to two code points, Σ to σ or ς by position
_UNKNOWN = np.iinfo(np.uint32).max  # a code point the tokeniser's table has not classified yet
# Odd multipliers, hence invertible modulo 2⁶⁴, for the polynomial hashes of tokens (over code
# points) and of shingles and LSH bands (over the hashes of tokens and of signature rows).
_CHAR_BASE = np.uint64(0x9E3779B97F4A7C15)
_COMBINE = np.uint64(0xC2B2AE3D27D4EB4F)
_BATCH_CHARS = 1 << 20  # per tokenising pass: arrays of a few MB, not hundreds of fresh MB
_FULL_PAIRS_BUCKET = 64  # LSH buckets up to this size emit all their pairs, larger ones a star


def tokens(text: str) -> list[str]:
    """The lowercase word tokens of a text; the batch tokeniser below reproduces these exactly."""
    return _WORD.findall(text.lower())


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """The distinct 64-bit hashes of a text's word shingles (uint64, sorted).

    A text with at least one but fewer than ``shingle_size`` tokens is one shingle of all of them;
    a text without tokens has no shingles.
    """
    hashes, _ = _shingles([text], shingle_size)
    return np.unique(hashes)


def text_shingles(texts: Sequence[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of every text's shingles, concatenated in order (repeats kept), and the index of
    the text each belongs to; hashed in batches of bounded memory. A text shorter than
    ``shingle_size`` is one shingle of all its tokens, which equals no full-length shingle."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    hashes, owners = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
    for lo, hi in budget_spans(lengths, _BATCH_CHARS):
        batch, counts = _shingles(texts[lo:hi], shingle_size)
        hashes.append(batch)
        owners.append(np.repeat(np.arange(lo, hi, dtype=np.int64), counts))
    return np.concatenate(hashes), np.concatenate(owners)


def minhash_signatures(texts: Sequence[str], *, num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)``, uint32, deterministic for a seed.

    A text without shingles gets a row of ``2³² − 1`` (rensa's empty sketch). A negative seed is
    taken modulo 2⁶⁴, as rensa's seed is unsigned.
    """
    signatures = np.empty((len(texts), num_perm), dtype=np.uint32)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    for lo, hi in budget_spans(lengths, _BATCH_CHARS):
        hashes, counts = _shingles(texts[lo:hi], shingle_size)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
        sketch = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed % 2**64)
        signatures[lo:hi] = sketch.to_rows()
    return signatures


def minhash_signatures_on(
    engine: DataEngine, texts: Sequence[str], *, num_perm: int, shingle_size: int, seed: int
) -> np.ndarray:
    """:func:`minhash_signatures` with the texts cut into one piece per call the engine runs at
    once: a signature depends on its own text only, so the pieces' signatures concatenate to the
    whole's, bit for bit."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    pieces = budget_spans(lengths, max(1, -(-int(lengths.sum()) // engine.parallelism())))
    return np.concatenate([
        np.empty((0, num_perm), dtype=np.uint32),
        *engine.map(minhash_signatures, [(texts[lo:hi],) for lo, hi in pieces],
                    common={"num_perm": num_perm, "shingle_size": shingle_size, "seed": seed}),
    ])


def lsh_candidate_pairs(signatures: np.ndarray, *, bands: int, rows: int) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of documents identical in at least one band: int64, ``(m, 2)``,
    unique and sorted.

    Documents without shingles are never paired. A bucket larger than ``_FULL_PAIRS_BUCKET`` (say
    ten thousand copies of one boilerplate page) would emit a quadratic number of pairs, so it
    only links each member to its first (smallest) member: a star connects the bucket just as well
    for union-find. The cost: a member that fails the Jaccard threshold against the first member is
    not tried against the others, and joins them only through another band.
    """
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the signature length {signatures.shape[1]}")
    live = np.flatnonzero(~is_empty(signatures))
    found = [np.empty((0, 2), dtype=np.int64)]
    for band in range(bands):
        key = band_key(signatures[live], band, rows)
        order = np.argsort(key, kind="stable")  # stable: members stay in ascending order
        found.append(bucket_pairs(bucket_starts(key[order]), live[order]))
    pairs = np.concatenate(found)
    n = np.int64(len(signatures))
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """For each pair, the fraction of signature positions where both documents agree (float64).

    A pair involving a document without shingles estimates 0: empty documents are not duplicates
    of each other.
    """
    estimate = np.empty(len(pairs), dtype=np.float64)
    step = 1 << 14  # pairs at a time, to bound the two blocks of gathered signature rows
    for lo in range(0, len(pairs), step):
        i, j = pairs[lo : lo + step, 0], pairs[lo : lo + step, 1]
        estimate[lo : lo + step] = agreement(signatures[i], signatures[j])
    return estimate


def agreement(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row by row, the fraction of positions where two blocks of signatures agree; 0 where either
    row is a document without shingles."""
    agree = np.count_nonzero(left == right, axis=1) / left.shape[1]
    return np.where(is_empty(left) | is_empty(right), 0.0, agree)


def band_key(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit key per signature for one LSH band (uint64): equal bands give equal keys, and a
    collision of unequal ones only adds a candidate, which the Jaccard check judges."""
    key = np.zeros(len(signatures), dtype=np.uint64)
    for column in signatures[:, band * rows : (band + 1) * rows].T.astype(np.uint64):
        key = key * _COMBINE + column
    return key


def cluster_near_duplicates(signatures: np.ndarray, *, bands: int, rows: int, threshold: float) -> np.ndarray:
    """Cluster id per document (int64): the smallest index of its cluster; a singleton is its own.

    Two documents are linked when LSH makes them candidates and their estimated Jaccard is at
    least ``threshold``; clusters are the connected components of those links.
    """
    pairs = lsh_candidate_pairs(signatures, bands=bands, rows=rows)
    links = pairs[estimated_jaccard(signatures, pairs) >= threshold]
    return components(len(signatures), links)


def exact_duplicate_representatives(hashes: Sequence[str]) -> np.ndarray:
    """Boolean mask: True at the first occurrence of each content hash."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        _, first = np.unique(np.asarray(hashes, dtype=str), return_index=True)
        keep[first] = True
    return keep


def jaccard(a: str, b: str, shingle_size: int) -> float:
    """Exact Jaccard similarity of two texts' shingle sets; 0 when both have none."""
    x, y = shingle_hashes(a, shingle_size), shingle_hashes(b, shingle_size)
    union = len(np.union1d(x, y))
    return len(np.intersect1d(x, y, assume_unique=True)) / union if union else 0.0


@functools.cache
def _lowercase_word_table() -> np.ndarray:
    """For every code point: its lowercase code point if that is a ``\\w`` character, else 0, or
    ``_UNKNOWN`` until a text contains it. Filled in by :func:`_lowercase_word_chars` as code points
    turn up: classifying all 1.1 million up front costs about a second in every process."""
    return np.full(sys.maxunicode + 1, _UNKNOWN, dtype=np.uint32)


def _lowercase_word_chars(points: np.ndarray) -> np.ndarray:
    """Each code point's lowercase code point if that is a ``\\w`` character, else 0.

    Derived from ``str.lower`` and ``re`` themselves, so the batch tokeniser cannot disagree with
    :func:`tokens`. ``str.lower`` maps one code point to one, independently of its neighbours,
    except for the characters in ``_IRREGULAR_CASE``: texts with those are lowercased by Python
    first, and as lowercasing is idempotent the table then leaves them unchanged.
    """
    table = _lowercase_word_table()
    folded = np.take(table, points)  # about twice as fast as table[points] for uint32 indices
    unknown = folded == _UNKNOWN
    if unknown.any():
        new = np.unique(points[unknown])
        chars = "".join(map(chr, new.tolist())).translate(dict.fromkeys(map(ord, _IRREGULAR_CASE), " "))
        lowered = np.frombuffer(chars.lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        words = np.frombuffer(re.sub(r"\W", " ", chars.lower()).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        table[new] = np.where(words == ord(" "), 0, lowered)
        folded = np.take(table, points)
    return folded


def _token_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the tokens of all texts, concatenated in order, and the count per text.

    Works on the code points of all texts at once; Python's ``re`` would create a string object per
    token, which costs more than all the hashing that follows.
    """
    texts = [text.lower() if any(c in text for c in _IRREGULAR_CASE) else text for text in texts]
    # A space is not a word character, so no token runs from one text into the next.
    raw = np.frombuffer(" ".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    points = _lowercase_word_chars(raw)
    word = np.concatenate([[False], points != 0, [False]])
    edges = np.flatnonzero(word[1:] != word[:-1])
    starts, ends = edges[::2], edges[1::2]
    text_starts = np.cumsum([0] + [len(text) + 1 for text in texts])
    counts = np.diff(np.searchsorted(starts, text_starts))
    # Polynomial hash of each token's code points, Σ c_(s+i) · B^i, from one prefix sum over all
    # code points: (prefix[end] − prefix[start]) · B^(−start). Arithmetic wraps modulo 2⁶⁴. It is
    # no cryptographic hash: crafted long tokens can collide, which at worst adds a shared shingle.
    power, inverse = _powers((len(points) - 1).bit_length())
    prefix = np.zeros(len(points) + 1, dtype=np.uint64)
    np.multiply(points, power[: len(points)], out=prefix[1:])
    np.cumsum(prefix, out=prefix)
    return mix64((np.take(prefix, ends) - np.take(prefix, starts)) * np.take(inverse, starts)), counts


@functools.cache
def _powers(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``B^i`` and ``B^(−i)`` modulo 2⁶⁴ for ``0 ≤ i < 2^bits`` (B is odd, so it has an inverse)."""

    def ladder(base: int) -> np.ndarray:
        out = np.ones(1 << bits, dtype=np.uint64)
        np.cumprod(np.full(len(out) - 1, base, dtype=np.uint64), out=out[1:])
        return out

    return ladder(int(_CHAR_BASE)), ladder(pow(int(_CHAR_BASE), -1, 2**64))


def mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads short tokens' small polynomial values over 64 bits."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _shingles(texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the k-shingles of all texts, concatenated in order (repeats kept), and the count
    per text."""
    if k < 1:
        raise ValueError(f"shingle_size must be at least 1, got {k}")
    token_hash, counts = _token_hashes(texts)
    n = len(token_hash)
    # Horner over the k tokens from every position on (zeros past the last one), computed on
    # shifted slices; windows that run into the next text are dropped below.
    padded = np.concatenate([token_hash, np.zeros(k - 1, dtype=np.uint64)])
    window = padded[:n].copy()
    for j in range(1, k):
        window = window * _COMBINE + padded[j : j + n]
    keep = np.arange(n) + k <= np.repeat(np.cumsum(counts), counts)
    # A text shorter than k is one shingle: its tokens followed by zeros in place of the next text's.
    short = (counts > 0) & (counts < k)
    if short.any():
        first, size = (np.cumsum(counts) - counts)[short], counts[short]
        h = np.zeros(len(first), dtype=np.uint64)
        for j in range(k):
            h = h * _COMBINE + np.where(j < size, token_hash[np.minimum(first + j, n - 1)], 0)
        window[first], keep[first] = h, True
    return window[keep], np.where(counts >= k, counts - k + 1, np.minimum(counts, 1))


def budget_spans(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Cut consecutive items into runs ``[lo, hi)``, a new run starting at each multiple of
    ``budget`` in their running total. Items are never split, so a run's last item may overrun."""
    if not len(sizes):
        return []
    run = (np.cumsum(sizes) - sizes) // budget
    cuts = np.flatnonzero(np.diff(run)) + 1
    bounds = [0, *cuts.tolist(), len(sizes)]
    return list(zip(bounds[:-1], bounds[1:]))


def is_empty(signatures: np.ndarray) -> np.ndarray:
    """Per row: whether it is the signature of a document without shingles."""
    return (signatures == np.iinfo(signatures.dtype).max).all(axis=1)


def bucket_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """For members sorted by their bucket's keys (all of them: a bucket is one value of each),
    True at the first member of each bucket."""
    new = np.zeros(len(sorted_keys[0]), dtype=bool)
    new[:1] = True
    for key in sorted_keys:
        new[1:] |= key[1:] != key[:-1]
    return new


def bucket_partners(new: np.ndarray) -> np.ndarray:
    """For members sorted into buckets (``new`` marks each bucket's first member), how many pairs
    each member opens with a later member of its bucket: all later ones in a small bucket; in a
    large one the first member opens a pair with every other one, and the others none."""
    if not len(new):
        return np.empty(0, dtype=np.int64)
    run_start = np.flatnonzero(new)
    size = np.diff(np.r_[run_start, len(new)])
    run_of = np.cumsum(new) - 1
    later = run_start[run_of] + size[run_of] - 1 - np.arange(len(new))
    return np.where((size[run_of] <= _FULL_PAIRS_BUCKET) | new, later, 0)


def bucket_pairs(new: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Pairs within buckets of members sorted by bucket (``new`` marks each bucket's first
    member), members ascending within a bucket: all pairs for a small bucket, the first member
    with each other one for a large bucket (:func:`bucket_partners`)."""
    partners = bucket_partners(new)
    position = np.arange(len(new))
    left = np.repeat(position, partners)
    right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(partners) - partners, partners)
    return np.stack([member[left], member[right]], axis=1)


def components(n: int, links: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes, each labelled with its smallest node.

    Vectorised union-find: hook every link's larger root onto its smaller one, then jump pointers
    until each node points at its root; repeat until no link joins two roots. A root only ever
    points to a smaller node, so the last root of a component is its smallest node.
    """
    root = np.arange(n, dtype=np.int64)
    i, j = links[:, 0], links[:, 1]
    while True:
        ri, rj = root[i], root[j]
        apart = ri != rj
        if not apart.any():
            return root
        np.minimum.at(root, np.maximum(ri, rj)[apart], np.minimum(ri, rj)[apart])
        while not np.array_equal(jumped := root[root], root):
            root = jumped
