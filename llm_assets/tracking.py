"""Experiment tracking in MLflow: one run per (asset, partition, attempt) that built an artifact.

A run holds the recipe as params (flattened), the curves the build returned as step metrics, its
final figures as metrics, and tags that tie it to the artifact (store URI and hash, never a copy),
its fingerprint, code version, git commit and the Dagster run. Tracking never fails a step: the
first call that fails (a server that is down, or slower than the request timeout) ends tracking
for the run and is reported as :attr:`TrackedRun.failure`. No Dagster here (docs/tracking.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic_core import to_jsonable_python

# The curves a build may return: STEP_METRICS, a list of records `{"step": N, "<metric>": value, ...}`
# (one per logged step, any metrics: loss, learning_rate, grad_norm, tokens_per_second, eval_*), or
# pretraining's own curves, [[step, loss], ...] and [[step, tokens seen, val loss], ...].
STEP_METRICS = "step_metrics"
_PAIR_CURVES = {"loss_history": "train_loss"}
_VAL_CURVES = {"val_history": "val_loss"}

# Tags of every run (the Dagster run groups the runs of one materialization: filter or group by it).
TAG_DAGSTER_RUN = "dagster_run_id"
TAG_ASSET = "asset"
TAG_PARTITION = "partition"
TAG_ATTEMPT = "attempt"
TAG_FINGERPRINT = "fingerprint"
TAG_CODE_VERSION = "code_version"
TAG_GIT_COMMIT = "git_commit"
TAG_ARTIFACT_URI = "artifact_uri"
TAG_ARTIFACT_SHA256 = "artifact_sha256"


def flatten_params(config: Any) -> dict[str, str]:
    """The recipe as MLflow params: nested keys joined with dots (a pydantic recipe's fields too,
    `recipe.learning_rate`), values as text cut to MLflow's length limit (a long list, e.g. a file
    signature, would otherwise make the whole batch fail)."""
    import pandas as pd  # with mlflow, when a run is tracked: not with every module that records one
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    config = to_jsonable_python(config, fallback=str)
    if not isinstance(config, Mapping) or not config:
        return {}
    [row] = pd.json_normalize(dict(config), sep=".").to_dict(orient="records")
    return {key[:MAX_ENTITY_KEY_LENGTH]: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in row.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def step_series(figures: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Every curve in what a build returned, by metric name: (step, value) points."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in figures.get(STEP_METRICS) or []:
        for name, value in record.items():
            if name != "step" and (number := _number(value)) is not None:
                series.setdefault(name, []).append((int(record["step"]), number))
    for key, name in _PAIR_CURVES.items():
        points = [(int(step), float(v)) for step, v in figures.get(key) or [] if _number(v) is not None]
        if points:
            series.setdefault(name, points)
    for key, name in _VAL_CURVES.items():
        points = [(int(step), float(v)) for step, _, v in figures.get(key) or [] if _number(v) is not None]
        if points:
            series.setdefault(name, points)
    return series


def final_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among what a build returned (losses, tokens, cost, eval scores)."""
    return {name: number for name, value in figures.items() if (number := _number(value)) is not None}


class TrackedRun:
    """One MLflow run, opened at construction. Every method is a no-op once a call has failed;
    the failure (what failed and why) is kept in :attr:`failure`."""

    def __init__(self, tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str],
                 params: Mapping[str, str]):
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failure: str | None = None
        self._call("opening the run", self._open, experiment, name, tags, params)

    def _open(self, experiment: str, name: str, tags: Mapping[str, str], params: Mapping[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(self.tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
        run = self._client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        self.run_id = run.info.run_id
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def _call(self, what: str, fn: Any, *args: Any) -> None:
        if self.failure is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a tracking server's failure must never fail the step
            self.failure = f"{what} at {self.tracking_uri}: {type(exc).__name__}: {str(exc)[:300]}"

    def finish(self, figures: Mapping[str, Any], tags: Mapping[str, str], status: str = "FINISHED") -> None:
        """Log the build's curves and final figures, tag the artifact, and end the run."""
        self._call("logging the results", self._finish, figures, tags, status)

    def _finish(self, figures: Mapping[str, Any], tags: Mapping[str, str], status: str) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        series = step_series(figures)
        last_step = max((step for points in series.values() for step, _ in points), default=0)
        metrics: Iterable[Metric] = [
            *(Metric(name, value, now, step) for name, points in series.items() for step, value in points),
            *(Metric(name, value, now, last_step) for name, value in final_figures(figures).items()),
        ]
        self._client.log_batch(self.run_id, metrics=list(metrics), tags=[RunTag(k, v) for k, v in tags.items()])
        self._client.set_terminated(self.run_id, status=status)

    def fail(self) -> None:
        """End the run as FAILED (the build raised)."""
        self._call("ending the failed run", lambda: self._client.set_terminated(self.run_id, status="FAILED"))
