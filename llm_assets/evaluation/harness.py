"""Run lm-eval on a Hugging Face model directory, offline, and keep the numbers.

lm-eval names every figure ``<metric>,<filter>`` (``acc,none``, ``exact_match,strict-match``) and
its standard error ``<metric>_stderr,<filter>``. Here a figure under the default filter ``none``
is named by its metric alone (``acc``) and one under another filter ``<metric>:<filter>``
(``exact_match:strict-match``); standard errors go to their own table under the same names.
lm-eval writes ``N/A`` where it has no standard error (perplexities, a single document): those are
left out, as are the non-numeric entries of its results (alias, sample counts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_assets.evaluation.tasks import TaskSetupError, load_task_dirs

_STDERR = "_stderr"


@dataclass(frozen=True)
class HarnessResult:
    """What lm-eval measured, per task (and per group, for grouped tasks such as MMLU)."""

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]  # lm-eval's own direction of each metric
    samples: dict[str, int]  # documents evaluated per task, after `limit`


def _figure_name(key: str) -> tuple[str, bool] | None:
    """(our name, is a standard error) of a results key ``metric,filter``; None for other keys."""
    metric, comma, filter_name = key.partition(",")
    if not comma:
        return None
    is_stderr = metric.endswith(_STDERR)
    metric = metric.removesuffix(_STDERR)
    return (metric if filter_name == "none" else f"{metric}:{filter_name}"), is_stderr


def _split_figures(task_results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, value in task_results.items():
        named = _figure_name(key)
        # bool is an int: lm-eval has none among its figures, but a True must not become 1.0.
        if named is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name, is_stderr = named
        (stderr if is_stderr else metrics)[name] = float(value)
    return metrics, stderr


def run_lm_eval(
    model_dir: Path,
    task_names: Sequence[str],
    include_paths: Sequence[Path],
    *,
    batch_size: int,
    limit: int | None,
    seed: int,
    bootstrap_iters: int = 100,
) -> HarnessResult:
    """Evaluate the model in ``model_dir`` (weights and tokenizer, as the export writes them) on
    ``task_names``, found under ``include_paths``, in fp32 on CUDA if there is one, else on the CPU.

    ``seed`` seeds Python's, numpy's and torch's RNGs and the few-shot sampler; tasks without a
    few-shot count of their own run zero-shot. ``limit`` caps the documents per task (None: all).
    ``bootstrap_iters`` > 0 gives standard errors: closed-form for means (acc, exact_match),
    bootstrapped (at most 100 resamples, in a process pool) for corpus scores such as chrF; 0
    skips them. Raises TaskSetupError for a missing model directory, task directory or task name.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TaskSetupError(f"{model_dir}: no config.json; give a Hugging Face model directory (as the export writes)")
    if not task_names:
        raise TaskSetupError("run_lm_eval: no task names; name at least one task of the include paths")
    manager = load_task_dirs(include_paths)
    unknown = [name for name in task_names if name not in manager.all_tasks]
    if unknown:
        where = ", ".join(str(p) for p in include_paths) or "no include path"
        raise TaskSetupError(
            f"unknown task(s) {unknown}: not defined by a YAML under {where}; known: "
            f"{', '.join(manager.all_tasks) or 'none'}. Fix the name or add the directory that defines it "
            "(lm-eval skips a YAML it cannot parse without a word: check that the file loads)"
        )
    # lm-eval bootstraps stderrs (chrF's) in a fork pool by default; forked from a Dagster step,
    # the workers trip its signal handlers on exit. The same resamples run in one loop instead.
    os.environ["DISABLE_MULTIPROC"] = "1"
    import lm_eval  # here: the definitions load without it (and without torch)

    from llm_assets.hf_models import training_device

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "tokenizer": str(model_dir), "dtype": "float32"},
        tasks=list(task_names),
        batch_size=batch_size,
        device=training_device().type,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results: only rank 0 gets them; call run_lm_eval in one process")
    metrics, stderr = {}, {}
    for task, task_results in results["results"].items():
        metrics[task], stderr[task] = _split_figures(task_results)
    return HarnessResult(
        metrics=metrics,
        stderr={task: figures for task, figures in stderr.items() if figures},
        # Keyed by metric alone: lm-eval gives one direction per metric, whatever the filter.
        higher_is_better={
            task: {metric: bool(better) for metric, better in directions.items() if better is not None}
            for task, directions in results["higher_is_better"].items()
        },
        samples={task: int(count["effective"]) for task, count in results["n-samples"].items()},
    )
