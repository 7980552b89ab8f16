"""Near-duplicate detection: tokenising, MinHash, LSH and clustering against exact Jaccard.

The planted corpus and the quality measure live in llm_assets/data/dedup_quality.py.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rensa

from llm_assets.data import dedup
from llm_assets.data.dedup import (
    cluster_near_duplicates,
    estimated_jaccard,
    exact_duplicate_representatives,
    jaccard,
    lsh_candidate_pairs,
    minhash_signatures,
    shingle_hashes,
    tokens,
)
from llm_assets.data.dedup_quality import Corpus, Writer, evaluate, planted_corpus
from llm_assets.manifest import DedupRecipe

RECIPE = DedupRecipe()


def signatures(texts: list[str], seed: int = 7) -> np.ndarray:
    return minhash_signatures(texts, num_perm=RECIPE.num_perm, shingle_size=RECIPE.shingle_size, seed=seed)


def clusters(texts: list[str]) -> np.ndarray:
    return cluster_near_duplicates(signatures(texts), bands=RECIPE.bands, rows=RECIPE.rows, threshold=RECIPE.threshold)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return planted_corpus(400, seed=11, variant_share=0.25)


# --- Tokens and shingles -----------------------------------------------------------------------

UNICODE_TEXTS = [
    "Hello, World_1! naïve CAFÉ",
    "İstanbul'da ΣΑΣ ½ ٣٤ x\u0301y ǅungla ﬁne",
    "tab\tsep\nnew-line -- 3.14 e=mc²",
    "emoji 🙂 joiner a\u200db surrogate \ud800 end",
    "",
    " \t ",
]


def test_tokens_are_lowercase_words():
    assert tokens("Hello, World_1! naïve CAFÉ 3.14") == ["hello", "world_1", "naïve", "café", "3", "14"]
    assert tokens("...") == []


def test_batch_tokeniser_agrees_with_tokens():
    hashes, counts = dedup._token_hashes(UNICODE_TEXTS)
    assert counts.tolist() == [len(tokens(t)) for t in UNICODE_TEXTS]
    one_by_one = []
    for token in itertools.chain.from_iterable(map(tokens, UNICODE_TEXTS)):
        alone, count = dedup._token_hashes([token])
        assert count.tolist() == [1], token
        one_by_one.append(alone[0])
    assert hashes.tolist() == one_by_one
    assert len(set(one_by_one)) == len(set(itertools.chain.from_iterable(map(tokens, UNICODE_TEXTS))))


def test_shingle_edge_cases():
    k = RECIPE.shingle_size
    for empty in ("", "  ", "!!! ... ???"):
        hashes = shingle_hashes(empty, k)
        assert hashes.dtype == np.uint64 and len(hashes) == 0
    assert len(shingle_hashes("One two three.", k)) == 1
    assert len(shingle_hashes("one two three four five", k)) == 1
    assert len(shingle_hashes("one two three four five six", k)) == 2
    assert len(shingle_hashes("a b a b a b a b", 2)) == 2  # {"a b", "b a"}: repeats count once
    assert not np.array_equal(shingle_hashes("one two", k), shingle_hashes("two one", k))
    assert np.array_equal(shingle_hashes("One, two!", k), shingle_hashes("one two", k))
    with pytest.raises(ValueError):
        shingle_hashes("one", 0)


def test_every_code_point_tokenises_as_tokens_does():
    # The tokeniser classifies code points as texts bring them; feed it all 1.1 million at once.
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    expected = tokens(every)
    hashes, counts = dedup._token_hashes([every])
    assert counts.tolist() == [len(expected)]
    assert hashes.tolist() == dedup._token_hashes(expected)[0].tolist()


def test_hashes_are_pinned():
    # Fixed arithmetic on code points and a seeded rensa, no per-process salt: these values hold on
    # every machine. If rensa changes its algorithm, MINHASH_ALGORITHM (in the fingerprint) changes too.
    assert dedup.MINHASH_ALGORITHM == "rensa.RMinHash v2"
    assert shingle_hashes("the quick brown fox", 2).tolist() == [
        1016070055023982132,
        10130215796640564082,
        14206112065614958442,
    ]
    sig = signatures(["the quick brown fox jumps over the lazy dog"])
    assert hashlib.sha256(sig.tobytes()).hexdigest()[:16] == "f189fcf83e822cf4"


def test_jaccard_is_exact():
    assert jaccard("a b c d", "a b c e", 1) == pytest.approx(3 / 5)
    assert jaccard("a b c", "A, b. C!", 2) == 1.0
    assert jaccard("a b c", "d e f", 1) == 0.0
    assert jaccard("", "", 5) == 0.0


# --- Signatures --------------------------------------------------------------------------------


def test_signatures_are_deterministic_and_seeded(corpus):
    texts = corpus.texts[:50]
    first = signatures(texts, seed=7)
    assert first.shape == (50, RECIPE.num_perm) and first.dtype == np.uint32
    assert np.array_equal(first, signatures(texts, seed=7))
    assert np.mean(first != signatures(texts, seed=8)) > 0.99


SIGNATURES_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import hashlib, sys
    from llm_assets.data.dedup import minhash_signatures
    from llm_assets.data.dedup_quality import planted_corpus
    texts = [*planted_corpus(300, seed=3).texts, *sys.argv[1:]]
    signatures = minhash_signatures(texts, num_perm=128, shingle_size=5, seed=7)
    print(hashlib.sha256(signatures.tobytes()).hexdigest())
""")


def test_signatures_are_identical_across_processes():
    def fresh(hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", SIGNATURES_IN_A_FRESH_PROCESS, *UNICODE_TEXTS[:3]],
            env=env, capture_output=True, text=True, check=True,
        )
        return run.stdout.strip()

    here = signatures([*planted_corpus(300, seed=3).texts, *UNICODE_TEXTS[:3]])
    assert fresh("1") == fresh("2") == hashlib.sha256(here.tobytes()).hexdigest()


def test_signatures_are_minhash_of_the_shingle_set():
    texts = [
        "the quick brown fox jumps over the lazy dog and runs away from the quick brown fox",
        "a b c d e f g h i j k l m n o p",
        "",
    ]
    sets = [shingle_hashes(t, RECIPE.shingle_size).tolist() for t in texts]
    by_set = rensa.RMinHash.digest_matrix_from_token_hash_sets(sets, RECIPE.num_perm, 7).to_rows()
    assert signatures(texts, seed=7).tolist() == by_set
    # MinHash's defining property: a union's signature is the elementwise minimum of its parts'.
    union = rensa.RMinHash.digest_matrix_from_token_hash_sets([sets[0] + sets[1]], RECIPE.num_perm, 7).to_rows()
    assert union[0] == np.minimum(by_set[0], by_set[1]).tolist()


def test_batching_does_not_change_signatures(corpus, monkeypatch):
    texts = ["", "short text", *corpus.texts[:60], "!!!", "tail"]
    whole = signatures(texts)
    monkeypatch.setattr(dedup, "_BATCH_CHARS", 3000)
    assert np.array_equal(signatures(texts), whole)
    assert np.array_equal(np.vstack([signatures([t]) for t in texts]), whole)


def test_identical_texts_have_identical_signatures():
    text = "A sentence that appears twice, with some words in it."
    sig = signatures([text, text.upper().replace(",", " ;"), text + " more"])
    assert np.array_equal(sig[0], sig[1])
    assert not np.array_equal(sig[0], sig[2])


def test_estimated_jaccard_tracks_exact(corpus):
    sig = signatures(corpus.texts)
    pairs = np.array(sorted({p for g in corpus.groups for p in itertools.combinations(g, 2)}))
    exact = np.array([jaccard(corpus.texts[i], corpus.texts[j], RECIPE.shingle_size) for i, j in pairs])
    error = np.abs(estimated_jaccard(sig, pairs) - exact)
    assert error.mean() < 0.04 and error.max() < 0.15


# --- LSH and clustering ------------------------------------------------------------------------


def test_empty_documents_never_cluster():
    text = "a document with enough words to make several shingles of five words"
    texts = ["", "", "!!! ???", text, text, "..."]
    sig = signatures(texts)
    assert (sig[[0, 1, 2, 5]] == np.iinfo(np.uint32).max).all()
    assert lsh_candidate_pairs(sig, bands=RECIPE.bands, rows=RECIPE.rows).tolist() == [[3, 4]]
    assert estimated_jaccard(sig, np.array([[0, 1], [3, 4]])).tolist() == [0.0, 1.0]
    assert clusters(texts).tolist() == [0, 1, 2, 3, 3, 5]


def test_candidate_pairs_are_unique_ordered_and_find_planted_copies(corpus):
    sig = signatures(corpus.texts)
    pairs = lsh_candidate_pairs(sig, bands=RECIPE.bands, rows=RECIPE.rows)
    assert pairs.dtype == np.int64 and pairs.ndim == 2 and pairs.shape[1] == 2
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    copies = [
        (i, j)
        for g in corpus.groups
        for i, j in itertools.combinations(g, 2)
        if corpus.texts[i] == corpus.texts[j]
    ]
    assert copies, "the corpus should plant exact copies"
    assert set(copies) <= set(map(tuple, pairs.tolist()))


def test_large_bucket_is_linked_as_a_star():
    words = " ".join(f"w{i}" for i in range(40))
    many = dedup._FULL_PAIRS_BUCKET + 30
    texts = ["some other text entirely", *[words] * many, "x y z"]
    sig = signatures(texts)
    pairs = lsh_candidate_pairs(sig, bands=RECIPE.bands, rows=RECIPE.rows)
    assert pairs.tolist() == [[1, j] for j in range(2, many + 1)]  # not many·(many−1)/2 pairs
    assert clusters(texts).tolist() == [0, *[1] * many, many + 1]

    few = ["some other text entirely", words, words, "x y z", words]
    pairs = lsh_candidate_pairs(signatures(few), bands=RECIPE.bands, rows=RECIPE.rows)
    assert pairs.tolist() == [[1, 2], [1, 4], [2, 4]]


def test_cluster_id_is_the_smallest_member():
    writer = Writer(np.random.default_rng(3))
    a, b, c = (writer.document(150) for _ in range(3))
    texts = [writer.render(d) for d in (a, b, writer.variant(a), c, writer.variant(b), writer.variant(a))]
    assert clusters(texts).tolist() == [0, 1, 0, 3, 1, 0]


def test_planted_near_duplicates_are_found(corpus):
    labels = clusters(corpus.texts)
    quality = evaluate(
        labels, corpus, threshold=RECIPE.threshold, shingle_size=RECIPE.shingle_size, random_pairs=2000, seed=5
    )
    assert quality.true_pairs >= 60  # the planted variants are near-duplicates by exact Jaccard
    assert quality.recall >= 0.9, quality
    assert quality.precision >= 0.9, quality
    distinct = [g[0] for g in corpus.groups[:20]]
    unrelated = itertools.combinations(distinct, 2)
    assert max(jaccard(corpus.texts[i], corpus.texts[j], RECIPE.shingle_size) for i, j in unrelated) < 0.05


@pytest.mark.parametrize("kept", [0.45, 0.75])
def test_documents_well_below_threshold_are_not_merged(kept):
    writer = Writer(np.random.default_rng(int(kept * 100)))
    texts = []
    for _ in range(60):
        doc = writer.document(int(writer.rng.integers(150, 301)))
        texts += [writer.render(doc), writer.render(writer.related(doc, kept))]
    exact = [jaccard(texts[i], texts[i + 1], RECIPE.shingle_size) for i in range(0, len(texts), 2)]
    assert max(exact) < RECIPE.threshold - 0.1
    sig = signatures(texts)
    candidates = lsh_candidate_pairs(sig, bands=RECIPE.bands, rows=RECIPE.rows)
    if kept > 0.5:
        # LSH does propose some of these pairs: it is the Jaccard check that keeps them apart.
        assert len(candidates) >= 3
    assert (clusters(texts) == np.arange(len(texts))).all()


def test_exact_duplicate_representatives_keep_the_first():
    assert exact_duplicate_representatives(["a", "b", "a", "c", "b", "a"]).tolist() == [
        True, True, False, True, False, False
    ]
    assert exact_duplicate_representatives([]).tolist() == []


def test_bands_must_fit_the_signature():
    with pytest.raises(ValueError, match="exceeds"):
        lsh_candidate_pairs(np.zeros((3, 8), dtype=np.uint32), bands=3, rows=3)
