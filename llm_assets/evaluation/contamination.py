"""The contamination gate over what the evaluation stage scores, on the training split.

``dataset_splits`` measures the training split against the held-out splits and the manifest's eval
sets (``contamination_gate``); the sources of this layer are measured here, with the same measure
(:func:`~llm_assets.data.contamination.measure_contamination`) and the same verdict:

- the shipped lm-eval tasks, built from the test split as ``eval_report`` builds them (at its
  largest answer and target lengths): a test document can be rare in the test split and still be
  one of the few dozen a shipped task scores;
- the manifest's lm-eval tasks (``evaluation.tasks``, found under ``evaluation.task_dirs``), whose
  documents lm-eval itself loads from the task YAMLs, as the harness does;
- every JSONL prompt file shipped in ``data/`` (the red-team prompts, and any prompt file added
  next to them), a set per file.

An lm-eval document is the text the model reads with every answer it is scored on: the prompt,
the choices of a multiple-choice task and the target, joined by newlines.
"""

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import polars as pl

from llm_assets.checks.scope import artifacts_under_check
from llm_assets.data.contamination import measure_contamination
from llm_assets.data.dataset_splits import contamination_result, dataset_splits, train_batches
from llm_assets.evaluation.safety import load_prompts
from llm_assets.evaluation.tasks import TaskSetupError, load_task_dirs, write_builtin_tasks
from llm_assets.manifest import PipelineManifest
from resources.artifact_store_resource import ArtifactStoreResource
from resources.pipeline import PipelineResource

if TYPE_CHECKING:
    from lm_eval.api.task import Task

PROMPT_DIR = Path(__file__).parent / "data"

EvalSets = dict[str, tuple[list[str], list[str]]]


def prompt_file_sets(folder: Path = PROMPT_DIR) -> EvalSets:
    """Each ``*.jsonl`` prompt file of ``folder`` as an eval set named by its stem, its documents
    numbered from 1 in file order. Raises TaskSetupError naming a file that cannot be read."""
    sets: EvalSets = {}
    for path in sorted(folder.glob("*.jsonl")):
        try:
            prompts = load_prompts(path)
        except ValueError as exc:
            raise TaskSetupError(str(exc)) from None
        sets[path.stem] = ([f"{path.stem}:{number}" for number in range(1, len(prompts) + 1)], prompts)
    return sets


def _leaf_tasks(tasks: Mapping[Any, Any]) -> list["Task"]:
    """The tasks of get_task_dict's answer, groups (nested dicts) opened."""
    leaves = []
    for value in tasks.values():
        leaves.extend(_leaf_tasks(value) if isinstance(value, Mapping) else [value])
    return leaves


def _as_texts(value: Any, choices: Sequence[str]) -> list[str]:
    """lm-eval's prompt or target of a document as texts: an int indexes the choices."""
    if isinstance(value, list):
        return [text for item in value for text in _as_texts(item, choices)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [choices[value]] if 0 <= value < len(choices) else []
    return [str(value)] if value is not None else []


def _document_text(task: "Task", doc: dict) -> str:
    # A multiple-choice target is one of the choices, already in.
    choices = list(task.doc_to_choice(doc)) if task.OUTPUT_TYPE == "multiple_choice" else []
    answers = choices or _as_texts(task.doc_to_target(doc), choices)
    parts = [*_as_texts(task.doc_to_text(doc), choices), *answers]
    return "\n".join(part for part in parts if part)


def task_sets(include_paths: Sequence[Path], task_names: Sequence[str]) -> EvalSets:
    """Every document of the named lm-eval tasks (groups opened into their tasks) under
    ``include_paths``, a set per task. Raises TaskSetupError naming the task and its YAML when a
    name is unknown or its data cannot be read."""
    from lm_eval.tasks import get_task_dict  # lm-eval loads when a gate reads tasks, not with the definitions

    manager = load_task_dirs(include_paths)
    sets: EvalSets = {}
    for name in task_names:
        if name not in manager.all_tasks:
            raise TaskSetupError(
                f"unknown task {name!r}: no YAML under {', '.join(map(str, include_paths)) or 'no include path'} "
                "defines it; fix evaluation.tasks or evaluation.task_dirs"
            )
        yaml_path = manager.task_index[name].yaml_path or "defined in Python"
        try:
            leaves = _leaf_tasks(get_task_dict([name], manager))
            for task in leaves:
                docs = list(task.eval_docs)
                sets[task.config.task] = (
                    [f"{task.config.task}:{i}" for i in range(len(docs))],
                    [_document_text(task, doc) for doc in docs],
                )
        except Exception as exc:  # lm-eval and datasets raise many kinds; each is the task's data failing
            raise TaskSetupError(
                f"task {name!r} ({yaml_path}): its documents cannot be read ({type(exc).__name__}: {exc}); "
                "fix its data files (dataset_path / dataset_kwargs) or remove it from evaluation.tasks"
            ) from exc
    return sets


def eval_stage_sets(manifest: PipelineManifest, test: pl.DataFrame, prompt_dir: Path = PROMPT_DIR) -> EvalSets:
    """What the evaluation stage scores: its shipped tasks built from the ``test`` split, the
    manifest's tasks, and the prompt files of ``prompt_dir``."""
    recipe = manifest.stages.evaluation
    sets = prompt_file_sets(prompt_dir)
    if recipe is None:
        return sets
    with tempfile.TemporaryDirectory(prefix="llm-assets-tasks-") as tasks_dir:
        shipped = write_builtin_tasks(test, Path(tasks_dir), seed=manifest.seed, max_docs=recipe.max_docs)
        sets.update(task_sets([Path(tasks_dir), *map(Path, recipe.task_dirs)], [*shipped, *recipe.tasks]))
    return sets


@dg.asset_check(
    asset=dataset_splits,
    blocking=True,
    description="n-gram overlap of train with the eval report's lm-eval tasks (shipped and the manifest's) and "
                "the shipped prompt files stays within the contamination gate.",
)
def eval_contamination_gate(
    context: dg.AssetCheckExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource
) -> dg.AssetCheckResult:
    store, manifest = artifact_store.get_store(), pipeline.load()
    recipe = manifest.stages.contamination
    reports = []
    for handle, _ in artifacts_under_check(context, dataset_splits.key, False, store):
        root = store.local_dir(handle.sha256)
        try:
            sets = eval_stage_sets(manifest, pl.read_parquet(root / "test.parquet"))
        except TaskSetupError as exc:  # an eval source that cannot be read cannot be cleared
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, description=str(exc))
        reports = [r.as_dict() for r in measure_contamination(train_batches(root), sets, recipe)]
    return contamination_result(reports, recipe.max_contaminated_fraction, "eval tasks and prompt files")
