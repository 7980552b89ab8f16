"""Derived preference pairs: hard negatives, fluent and on-topic but wrong, of comparable length."""

from __future__ import annotations

import difflib
import re

import polars as pl
import pytest

from llm_assets.manifest import PosttrainDataRecipe
from llm_assets.posttrain.derived import MAX_LENGTH_RATIO, derive_preference_pairs, derive_sft_examples, perturbed_fact
from llm_assets_tests.posttrain.test_datasets import corpus

# A small synthetic library: modules of several documented objects, as the stdlib corpus has them.
MODULES = {
    "queues": {
        "<module>": "Queues that hand items from producer threads to consumer threads.",
        "Queue": "Create a queue object with a given maximum size. If maxsize is 0 the queue size is infinite.",
        "Queue.put": "Put an item into the queue. If block is True, wait until a free slot is available.",
        "Queue.get": "Remove and return an item from the queue. The first item added is the first returned.",
        "Queue.qsize": "Return the approximate size of the queue; it is not reliable across threads.",
        "LifoQueue": "A variant of Queue that retrieves the most recently added entries first.",
    },
    "archive": {
        "<module>": "Read and write tar archives, with gzip, bz2 or lzma compression.",
        "TarFile.open": "Open a tar archive for reading, writing or appending. Return a TarFile object.",
        "TarFile.extractall": "Extract all members from the archive to the current working directory.",
        "TarFile.add": "Add the file name to the archive. Directories are added recursively by default.",
        "is_tarfile": "Return True if name points to a tar archive that the tarfile module can read.",
    },
    "timing": {
        "<module>": "Measure the execution time of small code snippets.",
        "repeat": "Call timeit() 5 times with the given number and return a list of the results.",
        "default_timer": "The default timer, which is always time.perf_counter() on every platform.",
    },
}


def library() -> pl.DataFrame:
    return corpus({f"stdlib:{mod}.py::{name}": doc for mod, docs in MODULES.items() for name, doc in docs.items()})


def one_site_changed(chosen: str, rejected: str) -> bool:
    """The rejected answer is the chosen one with one short run of words replaced."""
    ops = [op for op in difflib.SequenceMatcher(None, re.findall(r"\w+|\W", chosen),
                                                re.findall(r"\w+|\W", rejected)).get_opcodes() if op[0] != "equal"]
    return len(ops) == 1 and ops[0][2] - ops[0][1] <= 3 and ops[0][4] - ops[0][3] <= 3


@pytest.mark.parametrize("rejected_from", ["hard_negatives", "sibling_object", "perturbed_fact"])
def test_rejected_answers_are_on_topic_wrong_and_of_comparable_length(rejected_from):
    frame = library()
    answers = dict(derive_sft_examples(frame, 400).select("id", "completion").iter_rows())
    pairs = derive_preference_pairs(frame, 400, seed=7, rejected_from=rejected_from)
    kinds = []
    for row in pairs.iter_rows(named=True):
        assert row["chosen"] == answers[row["id"]]
        assert row["rejected"] != row["chosen"]
        module = row["id"].partition("::")[0]
        siblings = {answer for doc_id, answer in answers.items() if doc_id.startswith(module + "::")}
        kind = "sibling_object" if row["rejected"] in siblings else "perturbed_fact"
        assert kind == rejected_from or rejected_from == "hard_negatives"
        if kind == "perturbed_fact":
            assert one_site_changed(row["chosen"], row["rejected"]), row
        lengths = sorted((len(row["chosen"]), len(row["rejected"])))
        assert lengths[1] <= MAX_LENGTH_RATIO * lengths[0], row
        kinds.append(kind)
    assert pairs.height >= len(answers) - 3, "nearly every object has a hard negative"
    if rejected_from == "hard_negatives":
        assert 0.3 <= kinds.count("sibling_object") / len(kinds) <= 0.7, kinds
    # Seeded by ids, not by input order; another seed, other negatives.
    assert derive_preference_pairs(frame.reverse(), 400, seed=7, rejected_from=rejected_from).equals(pairs)
    other = derive_preference_pairs(frame, 400, seed=8, rejected_from=rejected_from)
    assert other["rejected"].to_list() != pairs["rejected"].to_list()


def test_a_sibling_comes_from_the_same_class_first_and_never_at_a_very_different_length():
    frame = corpus({
        "stdlib:a.py::Box.open": "Open the box and return its lid.",
        "stdlib:a.py::Box.shut": "Shut the box and keep its lid.",
        "stdlib:a.py::helper": "Help a caller find a box quickly.",
        "stdlib:a.py::Box.describe": "Describe the box at great length: " + "every side, corner and hinge. " * 8,
    })
    pairs = derive_preference_pairs(frame, 400, seed=0, rejected_from="sibling_object")
    rejected = dict(zip(pairs["id"], pairs["rejected"]))
    for seed in range(8):
        again = derive_preference_pairs(frame, 400, seed=seed, rejected_from="sibling_object")
        assert dict(zip(again["id"], again["rejected"]))["stdlib:a.py::Box.open"] == "Shut the box and keep its lid."
    assert "stdlib:a.py::Box.describe" not in rejected, "no sibling within the length ratio: left out"
    assert all("great length" not in r for r in rejected.values())
    # A module of one object has no sibling; with no fact to change either, it gives no pair.
    alone = corpus({"stdlib:b.py::f": "Tell a story about boats."})
    assert derive_preference_pairs(alone, 400, seed=0).is_empty()


@pytest.mark.parametrize(("answer", "possible"), [
    ("Retry at most 3 times.", {"Retry at most 4 times.", "Retry at most 2 times."}),
    ("Return True when done.", {"Return False when done."}),
    ("The file is not closed.", {"The file is closed.", "The file is not opened."}),
    ("The file is closed.", {"The file is opened."}),  # a negation is removed, never added
    ("Read and write it.", None),  # "read and read" would be broken, not wrong
    ("Always flush the stream.", {"Never flush the stream."}),
    ("It doesn't matter for Python 3.11 or 0.5 of x1.", None),
    ("Call get_item() on the Queue.", {"Call put_item() on the Queue.", "Call get_item() on the Deque."}),
])
def test_a_perturbed_fact_changes_one_number_opposite_negation_or_name(answer, possible):
    identifiers = ("Deque", "Queue", "get_item", "put_item")
    outcomes = {perturbed_fact(answer, identifiers, f"key{i}") for i in range(40)}
    assert outcomes == (possible or {None})


def test_default_recipe_rejects_hard_negatives():
    assert PosttrainDataRecipe().rejected_from == "hard_negatives"
    with pytest.raises(ValueError, match="hard_negatives"):
        PosttrainDataRecipe(rejected_from="shuffled_words")
