"""SFT and preference data sets: derived from docstrings, read from user files, decontaminated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from llm_assets.data.documents import ReadStats
from llm_assets.data.stdlib_source import discover, read
from llm_assets.manifest import PosttrainDataRecipe, PythonStdlibSource
from llm_assets.posttrain.dataset_files import read_dataset, write_dataset
from llm_assets.posttrain.dataset_schema import DataSetError
from llm_assets.posttrain.datasets import build_preference_dataset, build_sft_dataset
from llm_assets.posttrain.decontaminate import drop_eval_overlap
from llm_assets.posttrain.derived import answer_from_docstring, derive_sft_examples
from llm_assets.posttrain.user_files import read_preference_jsonl, read_sft_jsonl
from llm_assets.prompts import ASSISTANT_HEADER, PromptError, render_prompt

LONG = (
    "Decode a JSON document into Python objects. It accepts str only. "
    "Whitespace before and after is ignored, e.g. tabs and newlines. " * 6
)


def corpus(docs: dict[str, str], code: int = 2) -> pl.DataFrame:
    """A split frame as dataset_splits writes it: docstring documents plus some code documents."""
    rows = [
        {"id": doc_id, "text": text, "source": "stdlib", "uri": f"python-stdlib://3.11/{doc_id}", "kind": "docstring"}
        for doc_id, text in docs.items()
    ]
    rows += [
        {"id": f"stdlib:pkg/code{i}.py", "text": "def f():\n    return 1\n", "source": "stdlib",
         "uri": f"python-stdlib://3.11/pkg/code{i}.py", "kind": "code"}
        for i in range(code)
    ]
    return pl.DataFrame(rows).with_columns(sha256=pl.lit("x"))


def objects(prefix: str, n: int) -> dict[str, str]:
    return {
        f"stdlib:{prefix}/mod{i}.py::Thing{i}.run": f"Run thing number {i} of {prefix} carefully.\n\nMore detail {i}."
        for i in range(n)
    }


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def user_question(prompt: str) -> str:
    return prompt.removeprefix("### User:\n").removesuffix("\n\n" + ASSISTANT_HEADER)


def test_prompt_format_is_plain_text_ending_with_the_assistant_header():
    prompt = render_prompt([
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
    ])
    assert prompt == (
        "### System:\nBe terse.\n\n### User:\nHi?\n\n### Assistant:\nHello.\n\n### User:\nBye?\n\n### Assistant:\n"
    )
    with pytest.raises(PromptError, match="messages\\[0\\].role: unknown role 'human'"):
        render_prompt([{"role": "human", "content": "x"}])


def test_derived_prompts_name_the_dotted_object_and_vary_in_phrasing():
    frame = corpus({
        "stdlib:json/decoder.py::JSONDecoder.decode": "Return the Python representation of s.",
        "stdlib:json/__init__.py::<module>": "JSON (JavaScript Object Notation) is a data interchange format.",
        "stdlib:json/decoder.py::<module>": "Implementation of JSONDecoder.",
        "stdlib:no-path-here": "An id of another shape is skipped.",
    })
    sft = derive_sft_examples(frame, 400)
    by_id = {row["id"]: row for row in sft.iter_rows(named=True)}
    assert set(by_id) == {
        "stdlib:json/decoder.py::JSONDecoder.decode", "stdlib:json/__init__.py::<module>",
        "stdlib:json/decoder.py::<module>",
    }
    method = by_id["stdlib:json/decoder.py::JSONDecoder.decode"]
    assert "`json.decoder.JSONDecoder.decode`" in method["prompt"]
    assert method["prompt"].startswith("### User:\n") and method["prompt"].endswith(ASSISTANT_HEADER)
    assert method["completion"] == "Return the Python representation of s."
    assert method["source"] == "corpus:stdlib"
    package = user_question(by_id["stdlib:json/__init__.py::<module>"]["prompt"])
    assert "`json`" in package and "module" in package
    assert "`json.decoder`" in by_id["stdlib:json/decoder.py::<module>"]["prompt"]
    # Many objects: several phrasings, each a pure function of the id.
    many = derive_sft_examples(corpus(objects("pkg", 40)), 400)
    templates = {re.sub(r"`[^`]+`", "X", user_question(p)) for p in many["prompt"]}
    assert len(templates) >= 3
    assert many.equals(derive_sft_examples(corpus(objects("pkg", 40)).reverse(), 400))


def test_answers_are_cut_at_a_paragraph_or_sentence_boundary_within_the_limit():
    doc = "Short   summary\n    on two lines.\n\n    Second paragraph here.\n\n    >>> example()\n    1\n"
    assert answer_from_docstring(doc, 400) == "Short summary on two lines.\n\nSecond paragraph here."
    assert answer_from_docstring(doc, 40) == "Short summary on two lines."  # the second would overrun
    cut = answer_from_docstring(LONG, 150)
    assert len(cut) <= 150 and cut.endswith(".") and LONG.startswith(cut)
    assert not cut.endswith("e.g.")
    one_sentence = "word " * 100
    cut = answer_from_docstring(one_sentence, 50)
    assert len(cut) <= 50 and cut.endswith("…") and "wor…" not in cut
    assert answer_from_docstring("Args:\n    x: a thing\n", 100) == ""
    frame = corpus({"stdlib:a/b.py::f": ">>> f()\n1\n", "stdlib:a/b.py::g": LONG})
    sft = derive_sft_examples(frame, 120)
    assert sft["id"].to_list() == ["stdlib:a/b.py::g"]  # nothing left of f's docstring: skipped
    assert all(len(c) <= 120 for c in sft["completion"])


def test_derived_examples_from_real_stdlib_modules():
    source = PythonStdlibSource(
        kind="python_stdlib", include=["json/decoder.py", "json/__init__.py"], min_docstring_chars=0
    )
    docs = [doc for shard in discover(source) for doc in read(shard, source, 10**7, ReadStats())]
    frame = pl.DataFrame([doc.__dict__ for doc in docs])
    sft = derive_sft_examples(frame, 300)
    by_id = {row["id"]: row for row in sft.iter_rows(named=True)}
    decode = by_id["stdlib:json/decoder.py::JSONDecoder.decode"]
    assert "`json.decoder.JSONDecoder.decode`" in decode["prompt"]
    assert "Python representation" in decode["completion"]
    assert "`json`" in by_id["stdlib:json/__init__.py::<module>"]["prompt"]
    assert all(0 < len(c) <= 300 and c == c.strip() for c in sft["completion"])


def test_same_input_gives_identical_bytes_and_another_seed_another_pairing(tmp_path):
    recipe = PosttrainDataRecipe()
    docs = objects("train", 30)
    shards = [corpus(dict(list(docs.items())[:12])), corpus(dict(list(docs.items())[12:]))]
    val = corpus(objects("val", 6))
    sft_file = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) for i in range(20)
    ])

    def written(name: str, ds) -> dict[str, bytes]:
        write_dataset(ds, tmp_path / name)
        return {f: (tmp_path / name / f).read_bytes() for f in ("train.jsonl", "val.jsonl")}

    first = written("a", build_sft_dataset(shards, val, [sft_file], recipe, {}))
    # Other sharding and row order of the same corpus: same bytes.
    again = written("b", build_sft_dataset([shards[1].reverse(), shards[0]], val.reverse(), [sft_file], recipe, {}))
    assert first == again
    pref = [
        written(f"p{i}", build_preference_dataset(shards, val, [], recipe, {}, seed=s)) for i, s in enumerate((5, 5, 6))
    ]
    assert pref[0] == pref[1] and pref[0]["train.jsonl"] != pref[2]["train.jsonl"]
    rows = [json.loads(line) for line in first["train.jsonl"].decode().splitlines()]
    assert list(rows[0]) == sorted(rows[0]) == ["completion", "id", "prompt", "source"]


def test_every_malformed_line_is_reported_with_file_line_and_field(tmp_path):
    good = json.dumps({"prompt": "Q?", "completion": "A."})
    path = write_lines(tmp_path / "bad.jsonl", [
        good,                                                                     # 1
        "",                                                                       # 2 blank: skipped
        '{"prompt": "Q?", "completion": ',                                        # 3 invalid JSON
        b'{"prompt": "caf\xe9", "completion": "x"}',                              # 4 invalid UTF-8
        '["a list"]',                                                             # 5 not an object
        json.dumps({"prompt": "Q?"}),                                             # 6 missing completion
        json.dumps({"prompt": "  ", "completion": "A."}),                         # 7 empty prompt
        json.dumps({"prompt": "Q?", "completion": 3}),                            # 8 wrong type
        json.dumps({"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}),  # 9
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),            # 10 not ending with assistant
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}),  # 11
        json.dumps({"text": "raw"}),                                              # 12 neither format
        json.dumps({"messages": [{"from": "human", "value": "Hi"}]}),             # 13 ShareGPT
    ])
    with pytest.raises(DataSetError) as info:
        read_sft_jsonl(path)
    message = str(info.value)
    expected = {
        3: "invalid JSON", 4: "not valid UTF-8", 5: "expected a JSON object", 6: "'completion' is missing",
        7: "'prompt' is empty", 8: "'completion' must be a string, got int",
        9: "'messages[0].role' has unknown role 'human'",
        10: "last message must be the assistant's answer", 11: "'messages[1].content' is empty",
        12: "neither 'messages' nor 'prompt'", 13: "rename them to 'role'/'content'",
    }
    assert message.startswith(f"{path}: {len(expected)} malformed lines")
    for line, what in expected.items():
        pattern = rf"^  {re.escape(str(path))}:{line}: .*{re.escape(what)}"
        assert re.search(pattern, message, re.MULTILINE), (line, message)
    assert f"{path}:1:" not in message and f"{path}:2:" not in message
    assert len(info.value.errors) == len(expected)

    pref = write_lines(tmp_path / "pref.jsonl", [
        json.dumps({"prompt": "Q", "chosen": "A", "rejected": "A"}),
        json.dumps({"prompt": "Q", "chosen": "A"}),
        json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}),
    ])
    with pytest.raises(DataSetError) as info:
        read_preference_jsonl(pref)
    assert f"{pref}:1: fields 'chosen' and 'rejected' are identical" in str(info.value)
    assert f"{pref}:2: field 'rejected' is missing" in str(info.value)


def test_errors_are_capped_and_missing_or_empty_files_are_named(tmp_path):
    many = write_lines(tmp_path / "many.jsonl", ["not json"] * 30)
    with pytest.raises(DataSetError, match=r"30 malformed lines[\s\S]*\.\.\. and 10 more") as info:
        read_sft_jsonl(many)
    assert len(info.value.errors) == 20
    with pytest.raises(DataSetError, match=r"nope\.jsonl: no such file; .*stages\.posttrain_data\.sft_files"):
        read_sft_jsonl(tmp_path / "nope.jsonl")
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(DataSetError, match=r"blank\.jsonl: no records.*preference_files"):
        read_preference_jsonl(blank)


def test_user_records_become_prompt_completion_rows(tmp_path):
    rendered = render_prompt([{"role": "user", "content": "Already rendered?"}])
    path = write_lines(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [
            {"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ], "meta": {"ignored": True}}),
        "",
        json.dumps({"prompt": "Capital of France?", "completion": "Paris."}),
        json.dumps({"prompt": rendered, "completion": "Yes."}),
    ])
    rows = read_sft_jsonl(path).to_dicts()
    assert rows[0] == {
        "id": "chat.jsonl:1", "source": "file:chat.jsonl",
        "prompt": "### System:\nBe terse.\n\n### User:\nWhat is 2+2?\n\n### Assistant:\n", "completion": "4",
    }
    assert rows[1]["id"] == "chat.jsonl:3" and rows[1]["prompt"] == "### User:\nCapital of France?\n\n### Assistant:\n"
    assert rows[2]["prompt"] == rendered


def test_overlap_with_an_eval_set_drops_the_example_and_counts_it():
    frame = pl.DataFrame({
        "id": ["short", "completion", "clean", "long"],
        "prompt": [
            render_prompt([{"role": "user", "content": "What does `json.loads` do?"}]),
            render_prompt([{"role": "user", "content": "Tell me about something unrelated."}]),
            render_prompt([{"role": "user", "content": "What does `json.dumps` do?"}]),
            render_prompt([{"role": "user", "content": "one two three four five six seven eight nine ten"}]),
        ],
        "completion": [
            "Parses.",
            "It serialises the object to a JSON formatted str using this conversion table.",
            "Serialises.",
            "Counting.",
        ],
    })
    evals = {
        "quiz": ["Q: what DOES json.loads do??? Explain.", "nothing in common here"],
        "docs": ["The function serialises the object to a JSON formatted str using this conversion table!"],
        "count": ["... FOUR five six seven eight nine ten eleven"],
        "clean": ["completely different words"],
    }
    kept, counts = drop_eval_overlap(frame, ["prompt", "completion"], evals, ngram=6)
    assert kept["id"].to_list() == ["clean"]
    assert counts == {"quiz": 1, "docs": 1, "count": 1, "clean": 0}
    # Only the prompt has to be checked whole: a short completion found in an eval text stays.
    kept, counts = drop_eval_overlap(frame, ["prompt", "completion"], {"e": ["it parses."]}, ngram=6)
    assert kept.height == 4 and counts == {"e": 0}
    # An eval question shorter than n words inside a longer training prompt is found too.
    kept, counts = drop_eval_overlap(frame, ["prompt"], {"e": ["Two, three four."]}, ngram=6)
    assert kept["id"].to_list() == ["short", "completion", "clean"] and counts == {"e": 1}


def test_the_builder_drops_overlap_and_reports_it(tmp_path):
    recipe = PosttrainDataRecipe(ngram=8)
    docs = {
        "stdlib:json/__init__.py::dumps": "Serialize obj to a JSON formatted str using this conversion table.",
        "stdlib:json/__init__.py::loads": "Deserialize s to a Python object.",
        "stdlib:json/__init__.py::load": "Deserialize fp to a Python object.",
    }
    evals = {"bench": ["We serialize obj to a JSON formatted str using this conversion table, says the doc."]}
    ds = build_sft_dataset([corpus(docs)], corpus(objects("val", 2)), [], recipe, evals)
    assert ds.train["id"].to_list() == ["stdlib:json/__init__.py::load", "stdlib:json/__init__.py::loads"]
    assert ds.stats["dropped_overlap"] == {"bench": 1} and ds.stats["dropped_overlap_total"] == 1
    assert ds.stats["derived"] == {"train": 3, "val": 2}


def test_no_docstrings_and_no_files_is_a_clear_error(tmp_path):
    only_code = corpus({})
    with pytest.raises(DataSetError, match=r"no train examples: the corpus train split has no docstring documents "
                                           r"\(kind=docstring\).*stages\.posttrain_data\.sft_files"):
        build_sft_dataset([only_code], only_code, [], PosttrainDataRecipe(), {})
    with pytest.raises(DataSetError, match=r"preference data set has no train examples.*preference_files"):
        build_preference_dataset([only_code], only_code, [], PosttrainDataRecipe(), {}, seed=0)
    with pytest.raises(DataSetError, match="derive_from_corpus is false and stages.posttrain_data.sft_files is empty"):
        build_sft_dataset([corpus(objects("a", 3))], only_code, [], PosttrainDataRecipe(derive_from_corpus=False), {})
    # Docstrings in train but none in val (none held out of train either), and no file: val would be empty.
    with pytest.raises(DataSetError, match="no val examples: the corpus val split has no docstring documents"):
        build_sft_dataset([corpus(objects("a", 3))], only_code, [], PosttrainDataRecipe(val_fraction=1e-9), {})


def test_val_also_holds_out_a_fraction_of_the_train_split_by_id():
    recipe = PosttrainDataRecipe(val_fraction=0.25)
    train, val = corpus(objects("a", 40)), corpus(objects("b", 2))
    first = build_preference_dataset([train], val, [], recipe, {}, seed=3)
    again = build_preference_dataset([train], val, [], recipe, {}, seed=3)
    assert first.val.equals(again.val) and first.train.equals(again.train)
    held = [i for i in first.val["id"].to_list() if "stdlib:a/" in i]
    assert 0 < len(held) < 40 and first.stats["derived"]["val"] == 2 + len(held)
    # Held-out objects are out of training entirely: not asked about, not used as a rejected answer.
    train_texts = set(first.train["chosen"].to_list()) | set(first.train["rejected"].to_list())
    assert not train_texts & set(first.val["chosen"].to_list())


def test_user_files_split_deterministically_dedup_and_cap(tmp_path):
    lines = [json.dumps({"prompt": f"Question number {i}?", "completion": f"Answer {i}."}) for i in range(300)]
    lines.append(json.dumps({"prompt": "Question number 7?", "completion": "A duplicate prompt."}))
    path = write_lines(tmp_path / "qa.jsonl", lines)
    recipe = PosttrainDataRecipe(derive_from_corpus=False, val_fraction=0.2)
    ds = build_sft_dataset([], corpus({}), [path], recipe, {})
    assert ds.stats["files"] == {"qa.jsonl": {"train": ds.train.height + ds.stats["duplicates_removed"]["train"],
                                              "val": ds.val.height + ds.stats["duplicates_removed"]["val"]}}
    assert sum(ds.stats["duplicates_removed"].values()) == 1
    assert 0.12 < ds.val.height / 300 < 0.28
    assert set(ds.train["prompt"]).isdisjoint(ds.val["prompt"])
    assert ds.train.height + ds.val.height == 300
    kept = {**dict(zip(ds.train["prompt"], ds.train["id"])), **dict(zip(ds.val["prompt"], ds.val["id"]))}
    assert kept[render_prompt([{"role": "user", "content": "Question number 7?"}])] == "qa.jsonl:8"  # the first wins
    again = build_sft_dataset([], corpus({}), [path], recipe, {})
    assert again.train.equals(ds.train) and again.val.equals(ds.val)
    salted = build_sft_dataset([], corpus({}), [path], recipe.model_copy(update={"val_fraction": 0.5}), {})
    assert set(ds.val["prompt"]) < set(salted.val["prompt"])  # a larger fraction only adds to val
    capped = build_sft_dataset([], corpus({}), [path], recipe.model_copy(update={"max_examples": 25}), {})
    assert capped.train.height == 25 and capped.stats["capped"]["train"] == ds.train.height - 25
    assert set(capped.train["id"]) <= set(ds.train["id"])
    assert capped.train["id"].to_list() == [i for i in ds.train["id"] if i in set(capped.train["id"])]


def test_written_files_read_back_with_metadata(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": f"Q{i} | pipe?", "chosen": f"Good {i}", "rejected": f"Bad {i}"}) for i in range(40)
    ])
    ds = build_preference_dataset(
        [corpus(objects("a", 5))], corpus(objects("v", 3)), [path], PosttrainDataRecipe(), {}, seed=0
    )
    meta = write_dataset(ds, tmp_path / "out")
    train, val = read_dataset(tmp_path / "out")
    assert train == ds.train.to_dicts() and val == ds.val.to_dicts()
    assert meta["train_examples"] == len(train) and meta["val_examples"] == len(val)
    assert set(meta) >= {"mean_prompt_chars", "mean_chosen_chars", "mean_rejected_chars", "preview_markdown"}
    table = meta["preview_markdown"].splitlines()
    assert table[0] == "| prompt | chosen | rejected |" and len(table) == 5
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.jsonl").write_text("")
    with pytest.raises(DataSetError, match=r"half/val\.jsonl: missing"):
        read_dataset(tmp_path / "half")
