"""Experiment tracking as a Dagster resource: where the MLflow runs of the training, evaluation
and quantization steps go (the work is in llm_assets/tracking.py; docs/tracking.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg
from pydantic import Field

from llm_assets.settings import PROJECT_ROOT
from llm_assets.tracking import TrackedRun

# The embedded default: a sqlite store inside the checkout, so the quickstart tracks with no server
# (`make mlflow` opens its UI).
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / '.mlflow' / 'mlflow.db'}"
# Set to `off` to track nothing (e.g. tests that are not about tracking).
SWITCH_VARIABLE = "LLM_ASSETS_TRACKING"


class TrackingResource(dg.ConfigurableResource):
    """An MLflow tracking store: a server (`http://…`), or a database URI. Unset fields come from
    the environment at run time: `MLFLOW_TRACKING_URI` (else the checkout's `.mlflow/mlflow.db`),
    `MLFLOW_EXPERIMENT_NAME` (else `llm-assets`)."""

    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, "
                                     "else sqlite:///<checkout>/.mlflow/mlflow.db")
    experiment: str | None = Field(default=None, description="MLflow experiment; default $MLFLOW_EXPERIMENT_NAME, "
                                   "else llm-assets")
    stages: list[str] = Field(default=["pretrain", "posttrain", "evaluation", "quantize"],
                              description="The lifecycle stages (asset groups) whose steps are tracked")
    request_timeout_s: int = Field(default=5, description="Seconds an MLflow request may take before tracking "
                                   "gives up for the step ($MLFLOW_HTTP_REQUEST_TIMEOUT wins when set)")
    max_retries: int = Field(default=1, description="Retries of a failed MLflow request "
                                                    "($MLFLOW_HTTP_REQUEST_MAX_RETRIES wins when set)")
    enabled: bool = Field(default=True, description=f"False (or ${SWITCH_VARIABLE}=off) tracks nothing")

    def uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    def tracks(self, stage: str | None) -> bool:
        return self.enabled and os.environ.get(SWITCH_VARIABLE, "").lower() != "off" and stage in self.stages

    def start_run(self, name: str, tags: Mapping[str, str], params: Mapping[str, str]) -> TrackedRun:
        # MLflow reads its HTTP limits from the environment only; its defaults (120 s, 7 retries
        # with backoff) would hold a step for minutes on a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.request_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.max_retries))
        if self.uri().startswith("sqlite:///"):
            # A file store's folder must exist before MLflow creates the database in it.
            os.makedirs(os.path.dirname(self.uri().removeprefix("sqlite:///")) or ".", exist_ok=True)
        experiment = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "llm-assets"
        return TrackedRun(self.uri(), experiment, name, tags, params)
