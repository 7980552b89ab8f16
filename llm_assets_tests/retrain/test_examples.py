"""What the loop's fine-tune trains on (pure), and the release pointer's rule for fine-tuned releases."""

import json

import polars as pl
import pytest

from llm_assets.release_pointer import (
    FINE_TUNED_FROM,
    RELEASE_JSON,
    candidate_release,
    current_release,
    fine_tuned_from,
    move_release,
    promote_or_propose,
)
from llm_assets.retrain.examples import NotEnoughFeedback, feedback_examples
from llm_assets.store import open_store


def _sft(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"fb-{i}" for i in range(n)], "source": ["feedback"] * n,
                         "prompt": [f"q{i}" for i in range(n)], "completion": [f"a{i}" for i in range(n)]})


def _pairs(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"fc-{i}" for i in range(n)], "source": ["feedback"] * n,
                         "prompt": [f"p{i}" for i in range(n)], "chosen": [f"good{i}" for i in range(n)],
                         "rejected": [f"bad{i}" for i in range(n)]})


def test_liked_answers_and_corrections_are_sft_rows_with_a_stable_held_out_share():
    examples = feedback_examples(_sft(30), _pairs(10), 0.2, "feedback_dataset[xs]")
    rows = examples.sft_train + examples.sft_val
    assert len(rows) == 40 and {"prompt": "p3", "completion": "good3"} in rows  # a correction, as the answer
    assert 1 <= len(examples.sft_val) < 20
    assert len(examples.pairs_train) + len(examples.pairs_val) == 10
    assert examples.pairs_val and set(examples.pairs_val[0]) == {"prompt", "chosen", "rejected"}
    # More feedback later does not move an example already held out into training.
    more = feedback_examples(_sft(60), _pairs(10), 0.2, "feedback_dataset[xs]")
    assert all(row in more.sft_val for row in examples.sft_val)


def test_one_example_is_not_enough_and_the_error_says_why():
    with pytest.raises(NotEnoughFeedback, match=r"feedback_dataset\[xs\] holds 1 usable example.*at least 2"):
        feedback_examples(_sft(1), _pairs(0), 0.1, "feedback_dataset[xs]")
    two = feedback_examples(_sft(1), _pairs(1), 0.1, "feedback_dataset[xs]")
    assert len(two.sft_train) == 1 and len(two.sft_val) == 1 and not two.pairs_train


def test_a_release_re_stored_from_its_lineage_never_displaces_one_fine_tuned_from_it(tmp_path):
    store = open_store(str(tmp_path / "store"))

    def stored(name: str, document: dict) -> str:
        src = tmp_path / name
        src.mkdir()
        (src / RELEASE_JSON).write_text(json.dumps(document))
        return store.put_dir(src).sha256

    base = stored("base", {"n": 0})
    tuned = stored("tuned", {"n": 1, FINE_TUNED_FROM: base})
    retuned = stored("retuned", {"n": 2, FINE_TUNED_FROM: tuned})
    other = stored("other", {"n": 3})
    move_release(store, "xs", base, "promote", "run a")
    move_release(store, "xs", retuned, "promote", "canary")
    assert fine_tuned_from(store, retuned) == [tuned, base]

    said = promote_or_propose(store, "xs", base, canary=True, by="run b")
    assert "was fine-tuned from" in said and current_release(store, "xs") == retuned
    assert candidate_release(store, "xs") is None
    # Another lineage (a new SFT recipe, say) is proposed as usual.
    promote_or_propose(store, "xs", other, canary=True, by="run c")
    assert candidate_release(store, "xs") == other
