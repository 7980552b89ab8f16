"""Splits by hash are deterministic and disjoint; contamination finds what was planted."""

from __future__ import annotations

import polars as pl

from llm_assets.data.contamination import measure_contamination
from llm_assets.data.splits import assign_splits, split_of
from llm_assets.manifest import ContaminationRecipe, SplitRecipe


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({
        "id": [f"doc-{i}" for i in range(n)],
        "uri": [f"python-stdlib://3.11/mod{i // 3}.py#fn{i}" for i in range(n)],
        "text": [f"text {i}" for i in range(n)],
    })


def test_split_is_a_pure_function_of_the_key_and_salt():
    recipe = SplitRecipe(train=0.8, val=0.1, test=0.1)
    keys = [f"k{i}" for i in range(5000)]
    first = [split_of(k, recipe) for k in keys]
    assert first == [split_of(k, recipe) for k in keys]
    shares = {s: first.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["val"] - 0.1) < 0.02
    salted = [split_of(k, recipe.model_copy(update={"salt": "other"})) for k in keys]
    assert salted != first


def test_grouping_by_source_file_keeps_a_module_together():
    recipe = SplitRecipe(train=0.5, val=0.25, test=0.25)
    out = assign_splits(frame(300), recipe)
    per_module = out.with_columns(pl.col("uri").str.split("#").list.first().alias("module"))
    assert per_module.group_by("module").agg(pl.col("split").n_unique())["split"].max() == 1
    by_doc = assign_splits(frame(300), recipe.model_copy(update={"group_by": "document"}))
    assert by_doc["split"].to_list() != out["split"].to_list()


def test_contamination_finds_planted_overlap_and_ignores_clean_text():
    words = [f"w{i}" for i in range(5000)]
    train = [" ".join(words[i:i + 200]) for i in range(0, 4000, 200)]
    clean_eval = [" ".join(f"z{i}-{j}" for j in range(60)) for i in range(20)]
    copied = train[3]
    partial = " ".join(train[5].split()[:40]) + " " + " ".join(f"q{j}" for j in range(200))
    eval_sets = {
        "clean": ([f"c{i}" for i in range(20)], clean_eval),
        "leaky": (["copied", "partial", "clean0"], [copied, partial, clean_eval[0]]),
    }
    batches = [([f"t{i}" for i in range(10)], train[:10]), ([f"t{i}" for i in range(10, 20)], train[10:])]
    reports = {r.name: r for r in measure_contamination(batches, eval_sets, ContaminationRecipe())}
    assert reports["clean"].contaminated == 0 and reports["clean"].max_overlap == 0
    leaky = reports["leaky"]
    assert leaky.contaminated == 1 and leaky.worst[0] == {"id": "copied", "overlap": 1.0}
    assert 0.05 < dict((w["id"], w["overlap"]) for w in leaky.worst)["partial"] < 0.5
    assert abs(leaky.contaminated_fraction - 1 / 3) < 1e-9
