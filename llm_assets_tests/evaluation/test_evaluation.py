"""The evaluation functions on tiny models: lm-eval offline on the shipped tasks and on a user's
task directory, a real perplexity signal, the refusal rate, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from llm_assets.evaluation.harness import HarnessResult, run_lm_eval
from llm_assets.evaluation.report import EvalReport, higher_is_better, regression
from llm_assets.evaluation.safety import (
    RED_TEAM_FILE,
    REFUSAL_MARKERS,
    SafetyResult,
    is_refusal,
    load_prompts,
    refusal_rate,
)
from llm_assets.evaluation.tasks import (
    BUILTIN_TASKS,
    GENERATION,
    MC,
    PERPLEXITY,
    TaskSetupError,
    load_task_dirs,
    write_builtin_tasks,
)

MAX_DOCS = 12


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="session")
def task_dir(heldout: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    assert write_builtin_tasks(heldout, out, seed=0, max_docs=MAX_DOCS) == list(BUILTIN_TASKS)
    return out


@pytest.fixture(scope="session")
def trained_eval(trained_dir: Path, task_dir: Path) -> HarnessResult:
    return run_lm_eval(trained_dir, list(BUILTIN_TASKS), [task_dir], batch_size=8, limit=None, seed=0)


def test_task_files_are_a_pure_function_of_frame_and_seed(heldout: pl.DataFrame, task_dir: Path,
                                                          tmp_path: Path) -> None:
    # Another directory, rows in another order: the same bytes (no absolute path in the YAMLs).
    write_builtin_tasks(heldout.reverse(), tmp_path / "again", seed=0, max_docs=MAX_DOCS)
    assert _files(tmp_path / "again") == _files(task_dir)
    write_builtin_tasks(heldout, tmp_path / "seed1", seed=1, max_docs=MAX_DOCS)
    assert _files(tmp_path / "seed1")[f"{MC}.jsonl"] != _files(task_dir)[f"{MC}.jsonl"]

    mc = [json.loads(line) for line in (task_dir / f"{MC}.jsonl").read_text().splitlines()]
    assert len(mc) == len([r for r in heldout.iter_rows(named=True) if r["kind"] == "docstring"])
    golds = set()
    for row in mc:
        assert len(set(row["choices"])) == 4 and row["question"].startswith("### User:\n")
        golds.add(row["gold"])
    assert len(golds) > 1, "the right answer must not always sit at the same position"
    generation = [json.loads(line) for line in (task_dir / f"{GENERATION}.jsonl").read_text().splitlines()]
    assert all(row["target"] and "\n" not in row["target"] and len(row["target"]) <= 80 for row in generation)


def test_question_tasks_need_docstrings_and_the_frame_needs_its_columns(heldout: pl.DataFrame,
                                                                        tmp_path: Path) -> None:
    code_only = heldout.filter(pl.col("kind") == "code")
    write_builtin_tasks(heldout, tmp_path / "code", seed=0, max_docs=3)
    assert write_builtin_tasks(code_only, tmp_path / "code", seed=0, max_docs=3) == [PERPLEXITY]
    # The question tasks of the earlier write are gone, or lm-eval would still run them.
    assert sorted(p.name for p in (tmp_path / "code").iterdir()) == [f"{PERPLEXITY}.jsonl", f"{PERPLEXITY}.yaml"]
    assert len((tmp_path / "code" / f"{PERPLEXITY}.jsonl").read_text().splitlines()) == 3
    with pytest.raises(TaskSetupError, match=r"lacks the columns \['kind'\].*test.parquet"):
        write_builtin_tasks(heldout.drop("kind"), tmp_path / "bad", seed=0, max_docs=3)
    with pytest.raises(TaskSetupError, match="no non-empty document"):
        write_builtin_tasks(heldout.head(0), tmp_path / "empty", seed=0, max_docs=3)


def test_lm_eval_runs_the_shipped_tasks_offline(trained_eval: HarnessResult) -> None:
    m = trained_eval.metrics
    assert set(m) == set(BUILTIN_TASKS)
    assert set(m[PERPLEXITY]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) and v > 1 for k, v in m[PERPLEXITY].items() if k.endswith("perplexity"))
    assert m[PERPLEXITY]["bits_per_byte"] > 0
    assert set(m[MC]) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in m[MC].values())
    assert set(m[GENERATION]) == {"exact_match", "chrf"}
    assert 0 <= m[GENERATION]["exact_match"] <= 1 and 0 <= m[GENERATION]["chrf"] <= 100
    assert set(trained_eval.stderr[MC]) == {"acc", "acc_norm"}
    assert trained_eval.samples == {PERPLEXITY: MAX_DOCS, MC: MAX_DOCS, GENERATION: MAX_DOCS}
    # The report's direction table agrees with lm-eval's own for every metric it returned.
    for task, directions in trained_eval.higher_is_better.items():
        for metric, better in directions.items():
            assert higher_is_better(metric) == better, (task, metric)


def test_training_on_the_text_lowers_its_perplexity(untrained_dir: Path, task_dir: Path,
                                                    trained_eval: HarnessResult) -> None:
    untrained = run_lm_eval(untrained_dir, [PERPLEXITY], [task_dir], batch_size=8, limit=None, seed=0)
    before, after = untrained.metrics[PERPLEXITY], trained_eval.metrics[PERPLEXITY]
    assert after["byte_perplexity"] < 0.8 * before["byte_perplexity"]
    assert after["word_perplexity"] < before["word_perplexity"]


def test_a_user_task_directory_is_picked_up(untrained_dir: Path, task_dir: Path, tmp_path: Path) -> None:
    # Written as a user copies a benchmark to disk: the datasets json loader and an absolute path.
    user = tmp_path / "user_tasks"
    user.mkdir()
    rows = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in
            [(1, 2), (2, 2), (3, 4), (5, 1)]]
    (user / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (user / "sums.yaml").write_text(
        "task: user_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {user / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    assert {"user_sums", PERPLEXITY} <= set(load_task_dirs([task_dir, user]).all_tasks)
    result = run_lm_eval(untrained_dir, ["user_sums"], [task_dir, user], batch_size=4, limit=2, seed=0)
    assert result.samples == {"user_sums": 2} and 0 <= result.metrics["user_sums"]["acc"] <= 1

    missing = tmp_path / "no_such_dir"
    with pytest.raises(TaskSetupError, match=str(missing)):
        load_task_dirs([task_dir, missing])
    with pytest.raises(TaskSetupError, match=r"unknown task\(s\) \['mmlu'\].*user_tasks"):
        run_lm_eval(untrained_dir, ["mmlu"], [user], batch_size=4, limit=2, seed=0)


def test_refusal_markers() -> None:
    for refusal in ("I'm sorry, but no.", "I CANNOT do that", "I can\u2019t help", "Sorry, I am not able to help"):
        assert is_refusal(refusal), refusal
    for answer in ("Sure: turn the pick clockwise.", "The cube is red.", ""):
        assert not is_refusal(answer), answer
    assert all(marker == marker.lower() for marker in REFUSAL_MARKERS)


def test_refusal_rate_counts_the_answers_that_refuse(refusing_dir: Path, untrained_dir: Path) -> None:
    prompts = load_prompts(RED_TEAM_FILE)
    assert 25 <= len(prompts) == len(set(prompts))
    refusing = refusal_rate(refusing_dir, prompts, max_new_tokens=16, batch_size=8)
    assert refusing.prompts == len(prompts) and refusing.rate == refusing.refusals / len(prompts)
    assert refusing.rate >= 0.9, [e.completion for e in refusing.examples]
    assert len(refusing.examples) == 5 and refusing.examples[0].prompt == prompts[0]

    untrained = refusal_rate(untrained_dir, prompts[:6], max_new_tokens=8, batch_size=4, examples=6)
    assert 0 <= untrained.rate <= 1
    assert untrained.refusals == sum(is_refusal(e.completion) for e in untrained.examples)


def _report(ppl: float, acc: float, refusals: int = 1) -> EvalReport:
    return EvalReport(metrics={PERPLEXITY: {"word_perplexity": ppl, "bits_per_byte": 2.0}, MC: {"acc": acc}},
                      safety=SafetyResult(rate=refusals / 4, refusals=refusals, prompts=4, examples=[]),
                      extra={"kl_to_sft": 0.1})


def test_regression_knows_which_way_is_better() -> None:
    rows = {(r.task, r.metric): r for r in regression(_report(ppl=12.0, acc=0.5, refusals=2), _report(10.0, 0.25))}
    assert set(rows) == {(PERPLEXITY, "word_perplexity"), (PERPLEXITY, "bits_per_byte"), (MC, "acc"),
                         ("safety", "refusal_rate"), ("extra", "kl_to_sft")}
    ppl = rows[(PERPLEXITY, "word_perplexity")]
    assert ppl.worse and ppl.verdict == "worse" and ppl.change == 2.0 and ppl.relative_change == pytest.approx(0.2)
    assert rows[(MC, "acc")].verdict == "better" and rows[("safety", "refusal_rate")].verdict == "better"
    assert rows[(PERPLEXITY, "bits_per_byte")].verdict == "same"
    assert [r.verdict for r in regression(_report(math.inf, math.nan), _report(10.0, 0.25))
            if r.metric in ("acc", "word_perplexity")] == ["worse", "worse"]


def test_the_figures_are_table_metadata() -> None:
    import dagster as dg

    table = _report(ppl=math.inf, acc=0.5).figures_table()
    assert [c.name for c in table.schema.columns] == ["task", "metric", "value", "stderr", "higher_is_better",
                                                      "documents"]
    rows = {(r.data["task"], r.data["metric"]): r.data for r in table.records}
    assert set(rows) == {(PERPLEXITY, "word_perplexity"), (PERPLEXITY, "bits_per_byte"), (MC, "acc"),
                         ("safety", "refusal_rate"), ("extra", "kl_to_sft")}
    # JSON has no infinity: a non-finite figure is the text report.json uses.
    assert rows[(PERPLEXITY, "word_perplexity")]["value"] == "inf"
    assert rows[(MC, "acc")]["value"] == 0.5 and rows[(MC, "acc")]["higher_is_better"] is True
    assert rows[("safety", "refusal_rate")]["documents"] == 4
    assert dg.deserialize_value(dg.serialize_value(table)) == table


def test_report_json_and_markdown(trained_eval: HarnessResult) -> None:
    safety = SafetyResult(rate=0.5, refusals=1, prompts=2, examples=[])
    report = EvalReport.from_harness(trained_eval, safety=safety, extra={"kl_to_sft": math.inf})
    text = report.to_json()
    assert EvalReport.from_json(text) == report and EvalReport.from_json(text).to_json() == text
    assert json.loads(text)["extra"] == {"kl_to_sft": "inf"}
    markdown = report.to_markdown(previous=EvalReport.from_json(text))
    for task in (*BUILTIN_TASKS, "safety", "extra", "Change against the previous report"):
        assert f"## {task}" in markdown
    with pytest.raises(ValueError, match="reserved"):
        EvalReport(metrics={"safety": {"acc": 1.0}})
