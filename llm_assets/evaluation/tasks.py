"""lm-eval task directories: the three shipped held-out tasks, and users' own task directories.

Pure functions, no Dagster. :func:`write_builtin_tasks` turns the ``test.parquet`` frame of
``dataset_splits`` (columns ``id, text, source, uri, kind, sha256``) into a directory that
``TaskManager(include_path=dir)`` reads:

- ``heldout_perplexity`` (``loglikelihood_rolling``): held-out documents of every kind, at most
  ``max_docs``, each cut to ``max_doc_chars`` at a line end. Metrics ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte`` (lower is better).
- ``heldout_mc`` (``multiple_choice``): the question about a held-out docstring's object (the
  post-training prompt format, :func:`~llm_assets.prompts.render_prompt`, or the model's chat
  template when it has one), four
  answers: its own and three other objects' (the next distinct answers in a seeded sha256 order of
  the ids, wrapping around), in a seeded order. Metrics ``acc``, ``acc_norm``.
- ``heldout_generation`` (``generate_until``): the same question; the target is the first line of
  the answer cut at a sentence end within ``max_target_chars`` (or between words, with "…"),
  generated greedily until a newline or ``max_gen_toks``. Metrics ``exact_match`` and ``chrf``
  (sacrebleu's chrF, 0–100; sacrebleu is a dependency of lm-eval itself and works offline).

Each task is ``<name>.yaml`` + ``<name>.jsonl``. A task's YAML names its data file relative to
itself (``dataset_kwargs: {data_file: <name>.jsonl}``), loaded by :func:`load_task_data` through
lm-eval's ``custom_dataset`` hook: ``datasets``' own ``data_files`` resolve against the working
directory, which would tie the YAML to an absolute path and make the bytes depend on where the
directory was written. So the directory can be moved, stored and compared by content.

Same frame, seed and limits: the same bytes. Documents are chosen by a sha256 of the seed and the
id, never by input order or Python's salted ``hash()``.

A frame without docstrings (a corpus of plain files) gives no questions: the question tasks are
then left out (multiple choice also needs four different answers), and the returned names say
which tasks were written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from llm_assets.jsonl import read_written_jsonl
from llm_assets.posttrain.derived import derive_sft_examples

if TYPE_CHECKING:
    import datasets
    from lm_eval.tasks import TaskManager

PERPLEXITY, MC, GENERATION = "heldout_perplexity", "heldout_mc", "heldout_generation"
BUILTIN_TASKS = (PERPLEXITY, MC, GENERATION)
MC_CHOICES = 4
FRAME_COLUMNS = ("id", "text", "source", "kind")
_LOADER = "llm_assets.evaluation.tasks.load_task_data"


class TaskSetupError(ValueError):
    """Eval tasks cannot be written or found; the message names the file or field and the fix."""


def _order_key(seed: int, *parts: str) -> bytes:
    return hashlib.sha256("\x00".join((str(seed), *parts)).encode("utf-8")).digest()


def _cut_at_line(text: str, max_chars: int) -> str:
    """At most ``max_chars``: whole lines while they fit, else a hard cut (one very long line)."""
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars)
    return text[: end + 1] if end > 0 else text[:max_chars]


def _metric(name: str, aggregation: str, higher_is_better: bool) -> dict[str, Any]:
    # Spelled out: without them lm-eval logs a warning per metric and falls back to its registry.
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


class _Dumper(yaml.SafeDumper):
    """Double-quotes strings with a line break: `until: ["\\n"]`, not a folded single-quoted scalar."""


_Dumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)
)


def _write_task(out_dir: Path, name: str, config: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    (out_dir / f"{name}.jsonl").write_text(data, encoding="utf-8")
    header = {"task": name, "dataset_kwargs": {"data_file": f"{name}.jsonl"}, "test_split": "test"}
    body = yaml.dump({**header, **config, "metadata": {"version": 1.0}}, Dumper=_Dumper, sort_keys=False,
                     allow_unicode=True)
    # `!function` is lm-eval's YAML tag for a callable; the safe dumper cannot write custom tags.
    (out_dir / f"{name}.yaml").write_text(f"{body}custom_dataset: !function {_LOADER}\n", encoding="utf-8")


def _check_frame(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise TaskSetupError(
            f"the held-out frame lacks the columns {missing}; pass dataset_splits' test.parquet "
            "(columns id, text, source, uri, kind, sha256)"
        )
    # Unique by id, choosing among repeats by content, so that the input order never matters.
    return frame.select(FRAME_COLUMNS).sort("id", "text").unique("id", keep="first", maintain_order=True)


def _perplexity_rows(frame: pl.DataFrame, seed: int, max_docs: int, max_doc_chars: int) -> list[dict[str, str]]:
    docs = sorted(
        (row for row in frame.iter_rows(named=True) if row["text"].strip()),
        key=lambda row: _order_key(seed, row["id"]),
    )
    return [{"id": r["id"], "kind": r["kind"], "text": _cut_at_line(r["text"], max_doc_chars)} for r in docs[:max_docs]]


def _questions(frame: pl.DataFrame, seed: int, max_answer_chars: int,
               render: Callable[[str], str] | None) -> list[dict[str, str]]:
    """The docstrings' (id, prompt, answer) in the seeded order, each prompt through `render`."""
    examples = derive_sft_examples(frame, max_answer_chars).iter_rows(named=True)
    rendered = ({**row, "prompt": render(row["prompt"])} for row in examples) if render else examples
    return sorted(rendered, key=lambda row: _order_key(seed, row["id"]))


def _mc_rows(questions: Sequence[dict[str, str]], seed: int, max_docs: int) -> list[dict[str, Any]]:
    rows = []
    for position, question in enumerate(questions):
        own = question["completion"]
        choices = [own]
        for step in range(1, len(questions)):
            other = questions[(position + step) % len(questions)]["completion"]
            if other not in choices:
                choices.append(other)
                if len(choices) == MC_CHOICES:
                    break
        if len(choices) < MC_CHOICES:
            continue  # fewer than four distinct answers in the whole frame
        choices.sort(key=lambda answer: _order_key(seed, question["id"], answer))
        rows.append({"id": question["id"], "question": question["prompt"], "choices": choices,
                     "gold": choices.index(own)})
        if len(rows) == max_docs:
            break
    return rows


def _generation_rows(questions: Sequence[dict[str, str]], max_docs: int) -> list[dict[str, str]]:
    # The model stops at a newline; a target spanning paragraphs could never be matched.
    rows = [{"id": q["id"], "prompt": q["prompt"], "target": q["completion"].partition("\n")[0]} for q in questions]
    return rows[:max_docs]


def write_builtin_tasks(
    test_frame: pl.DataFrame,
    out_dir: Path,
    *,
    seed: int,
    max_docs: int,
    max_doc_chars: int = 2000,
    max_answer_chars: int = 200,
    max_target_chars: int = 80,
    max_gen_toks: int = 48,
    render: Callable[[str], str] | None = None,
) -> list[str]:
    """Write the shipped tasks' YAML and JSONL files into ``out_dir``; returns the names written.

    ``max_docs`` caps the documents of each task; ``max_doc_chars`` the length of a perplexity
    document, ``max_answer_chars`` of a multiple-choice answer, ``max_target_chars`` of a
    generation target; ``max_gen_toks`` the tokens generated per question (it must leave room for
    the prompt in the model's context). ``render`` re-renders each question's prompt (stored in the
    project's prompt format) for a model prompted otherwise: in its tokenizer's chat template
    (``prompts.chat_renderer``); without it the prompts are the project's format. Raises
    TaskSetupError for a frame without the split's columns or without a single non-empty document.
    """
    limits = {"max_docs": max_docs, "max_doc_chars": max_doc_chars, "max_answer_chars": max_answer_chars,
              "max_target_chars": max_target_chars, "max_gen_toks": max_gen_toks}
    bad = [f"{name} = {value}" for name, value in limits.items() if value < 1]
    if bad:
        raise TaskSetupError(f"write_builtin_tasks: {', '.join(bad)}; every limit must be at least 1")
    frame = _check_frame(test_frame)
    perplexity = _perplexity_rows(frame, seed, max_docs, max_doc_chars)
    if not perplexity:
        raise TaskSetupError(
            f"the held-out frame has no non-empty document ({test_frame.height} rows); the test split is empty: "
            "give stages.splits.test a larger share or add sources to the manifest"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A task left out this time must not survive from an earlier write: lm-eval would still find it.
    for name in BUILTIN_TASKS:
        for suffix in (".yaml", ".jsonl"):
            (out_dir / f"{name}{suffix}").unlink(missing_ok=True)
    _write_task(out_dir, PERPLEXITY, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [_metric(m, agg, False) for m, agg in (
            ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
            ("bits_per_byte", "bits_per_byte"))],
    }, perplexity)
    written = [PERPLEXITY]

    mc = _mc_rows(_questions(frame, seed, max_answer_chars, render), seed, max_docs)
    if mc:
        _write_task(out_dir, MC, {
            "output_type": "multiple_choice",
            "doc_to_text": "question",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            # The prompt ends with the assistant header's newline; the answer follows it directly.
            "target_delimiter": "",
            "metric_list": [_metric("acc", "mean", True), _metric("acc_norm", "mean", True)],
        }, mc)
        written.append(MC)

    generation = _generation_rows(_questions(frame, seed, max_target_chars, render), max_docs)
    if generation:
        _write_task(out_dir, GENERATION, {
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "target",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
            "metric_list": [_metric("exact_match", "mean", True), _metric("chrf", "chrf", True)],
        }, generation)
        written.append(GENERATION)
    return written


def load_task_data(data_file: str, config_source: str, **_: Any) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook for the tasks written here: the ``test`` split from
    ``data_file``, relative to the task's YAML (``config_source``, which lm-eval passes with the
    task's other metadata, ignored here)."""
    import datasets  # lm-eval calls this when it loads a task: the library is loaded by then

    path = Path(config_source).parent / data_file
    rows = read_written_jsonl(
        path, TaskSetupError,
        f"the task {config_source} reads its documents from it (dataset_kwargs.data_file): "
        "write the task directory again with write_builtin_tasks",
        "write the task directory again",
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def perplexity_texts(tasks_dir: Path, limit: int | None) -> list[str]:
    """The strings lm-eval scores for ``heldout_perplexity`` written in ``tasks_dir``: each
    document's ``text`` (its ``doc_to_target``), the first ``limit`` of them (lm-eval's limit;
    None: all)."""
    yaml_path = Path(tasks_dir) / f"{PERPLEXITY}.yaml"
    texts = load_task_data(f"{PERPLEXITY}.jsonl", str(yaml_path))["test"]["text"]
    return texts[:limit] if limit is not None else texts


def load_task_dirs(paths: Sequence[Path], *, include_defaults: bool = False) -> TaskManager:
    """A TaskManager that knows every task YAML under ``paths`` (searched recursively).

    lm-eval's own task catalogue is left out unless ``include_defaults``: its tasks download their
    data from the Hugging Face hub, which these machines cannot reach, and indexing it costs
    seconds. Raises TaskSetupError naming a path that is missing, not a directory, or holds no
    ``*.yaml`` file.
    """
    from lm_eval.tasks import TaskManager  # lm-eval loads when tasks are read, not with the definitions

    resolved = []
    for path in map(Path, paths):
        if not path.exists():
            raise TaskSetupError(f"{path}: no such task directory; fix the path or create it with task YAML files")
        if not path.is_dir():
            raise TaskSetupError(f"{path}: not a directory; give the directory that holds the task YAML files")
        if next(path.rglob("*.yaml"), None) is None:
            raise TaskSetupError(f"{path}: holds no *.yaml task config; add lm-eval task YAMLs or remove the path")
        resolved.append(path.resolve())
    return TaskManager(include_path=resolved or None, include_defaults=include_defaults)
