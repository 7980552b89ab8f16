"""`llm-assets materialize` under the k8s executor submits runs to the instance's run launcher and
executes nothing itself.

No cluster can run here: the run launcher is a stand-in for K8sRunLauncher that records what it
was asked to launch and, like a cluster that ran the run, reports the run's end (a success or a
failure, as the test sets it). Everything else is real: the instance, the code location, the
runs, their execution plans and the run coordinators.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster._utils.hosted_user_process import recon_job_from_origin

import llm_assets.definitions
from llm_assets.cli import EXIT_OK, main
from llm_assets.killed_drivers import DRIVER_PROCESS_TAG
from llm_assets.runner import RUN_TAG
from llm_assets.submit import SUBMITTED, code_location_workspace, submit_graph
from llm_assets_tests.test_cli_driver import cli_env  # noqa: F401 (a fixture)

LOCATION = "llm-assets"


class RecordingRunLauncher(RunLauncher, ConfigurableClass):
    """The cluster, mocked: records each launched run; `outcome` ends it as a cluster would."""

    launched: list[dg.DagsterRun] = []
    outcome: str | None = None  # None: the run stays STARTING (the pod is still running)

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        self._inst_data = inst_data

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict[str, Any]) -> RecordingRunLauncher:
        return cls(inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        type(self).launched.append(run)
        if self.outcome is None:
            return
        self._instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name),
                                            run_id=run.run_id)
        end = DagsterEventType.RUN_SUCCESS if self.outcome == "success" else DagsterEventType.RUN_FAILURE
        self._instance.report_dagster_event(DagsterEvent(end.value, job_name=run.job_name), run_id=run.run_id)

    def terminate(self, run_id: str) -> bool:
        return False


@pytest.fixture
def cluster(monkeypatch) -> Iterator[type[RecordingRunLauncher]]:
    monkeypatch.setattr(RecordingRunLauncher, "launched", [])
    monkeypatch.setattr(RecordingRunLauncher, "outcome", None)
    yield RecordingRunLauncher


@pytest.fixture
def k8s_defs(settings, monkeypatch) -> dg.Definitions:
    """The Definitions under LLM_ASSETS_EXECUTOR=k8s, as the code location serves them."""
    defs = llm_assets.definitions.build_definitions(replace(settings, executor="k8s"))
    monkeypatch.setattr(llm_assets.definitions, "defs", defs)
    return defs


@pytest.fixture
def k8s_instance(cluster) -> Iterator[dg.DagsterInstance]:
    # The default coordinator hands a submitted run to the launcher at once (the queued one,
    # production's, waits for the daemon: see the CLI test below).
    overrides = {"run_launcher": {"module": __name__, "class": "RecordingRunLauncher"},
                 "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"}}
    with dg.DagsterInstance.local_temp(overrides=overrides) as instance:
        yield instance


def _submit(defs: dg.Definitions, instance: dg.DagsterInstance, selection: str):
    with code_location_workspace(instance, LOCATION) as workspace:
        return submit_graph(defs, instance, workspace, LOCATION, selection, log=lambda line: None, poll_seconds=0.1)


def test_runs_are_launched_by_the_run_launcher_with_the_k8s_executor(k8s_defs, k8s_instance, cluster, settings):
    result = _submit(k8s_defs, k8s_instance, 'key:"raw_corpus"')

    shards = k8s_instance.get_dynamic_partitions("corpus_shards")
    assert len(shards) >= 2 and result.success
    assert sorted(r.partition for r in result.runs) == sorted(shards)  # one run per shard
    assert sorted(r.run_id for r in cluster.launched) == sorted(r.run_id for r in result.runs)
    for run in cluster.launched:
        stored = k8s_instance.get_run_by_id(run.run_id)
        assert stored.status == dg.DagsterRunStatus.STARTING  # handed to the cluster, not run here
        assert stored.tags[RUN_TAG] == SUBMITTED and stored.tags["dagster/partition"] in shards
        assert DRIVER_PROCESS_TAG not in stored.tags  # outlives this process: not a killed driver's run
        assert stored.asset_selection == {dg.AssetKey("raw_corpus")}
        # What a run pod executes: the project's Definitions, from the code location it was made from.
        assert stored.job_code_origin.repository_origin.code_pointer.module == "llm_assets.definitions"
        assert stored.remote_job_origin.location_name == LOCATION
        # A run pod loads the job from the run's origin: its executor is the k8s one, which starts
        # a pod per step, sized by the step's op tags or, for the data stages, the manifest's compute.data.
        job = recon_job_from_origin(stored.job_code_origin).get_definition()
        assert job.executor_def.name == "k8s"
        per_step = dg.validate_run_config(job, stored.run_config)["execution"]["k8s"]["per_step_k8s_config"]
        assert per_step["raw_corpus"]["container_config"]["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    # Nothing executed in this process: no materialization, no artifact.
    assert k8s_instance.get_latest_materialization_event(dg.AssetKey("raw_corpus")) is None
    assert not Path(settings.store_uri).exists() or not any(Path(settings.store_uri).rglob("*.parquet"))


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_a_wave_is_submitted_once_the_one_before_succeeded(k8s_defs, k8s_instance, cluster, outcome):
    # raw_corpus (one run per shard), then corpus_inventory (one run), which reads them.
    cluster.outcome = outcome
    result = _submit(k8s_defs, k8s_instance, 'key:"raw_corpus" or key:"corpus_inventory"')
    selections = [set(run.asset_selection) for run in cluster.launched]
    shards = len(k8s_instance.get_dynamic_partitions("corpus_shards"))
    assert selections[:shards] == [{dg.AssetKey("raw_corpus")}] * shards
    if outcome == "success":
        assert selections[shards:] == [{dg.AssetKey("corpus_inventory")}] and result.success
    else:  # the cluster failed the first wave: its downstream is never submitted
        assert len(selections) == shards and not result.success
        assert sorted(result.failed_runs) == sorted(run.run_id for run in cluster.launched)


@pytest.mark.usefixtures("cli_env")
def test_materialize_on_k8s_queues_the_runs_and_names_them(k8s_defs, monkeypatch, capsys):
    # The instance of the embedded default (dagster.yaml): the queued coordinator, whose daemon launches runs.
    monkeypatch.setenv("LLM_ASSETS_EXECUTOR", "k8s")
    assert main(["materialize", "--select", "key:raw_corpus"]) == EXIT_OK
    out = capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert runs and {run.status for run in runs} == {dg.DagsterRunStatus.QUEUED}
        assert instance.get_latest_materialization_event(dg.AssetKey("raw_corpus")) is None
    for run in runs:
        assert run.run_id in out and run.tags["dagster/partition"] in out
    assert f"{len(runs)} run(s) submitted" in out and f"{RUN_TAG}={SUBMITTED}" in out


def test_a_definitions_module_that_does_not_load_is_named(k8s_instance, monkeypatch):
    monkeypatch.delattr(llm_assets.definitions, "defs")
    with pytest.raises(RuntimeError, match="llm_assets.definitions:defs did not load"):
        with code_location_workspace(k8s_instance, LOCATION):
            pass
