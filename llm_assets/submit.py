"""Submit the asset graph to the instance's run launcher instead of executing it here: what
`llm-assets materialize` does when the executor is `k8s` (LLM_ASSETS_EXECUTOR=k8s).

The in-process driver (`llm_assets.runner`) runs every step in its own process. On a cluster the
runs belong to the cluster: this module creates them on the instance against the code location
the webserver and daemon serve (`llm_assets.definitions:defs`, the Helm chart's user deployment)
and hands them to `instance.submit_run`. The instance's run coordinator queues them, its run
launcher (K8sRunLauncher in production) starts a pod per run, and there the job's `k8s` executor
starts a pod per step, sized by the step's `dagster-k8s/config` op tag (GPUs for training).

The runs are planned like the driver's: waves of assets that share a partitioning, one run per
partition (`runner.plan_waves`). A wave reads the artifacts of the waves before it, so each wave
is submitted once the previous one has succeeded; the last wave is submitted and left running.
The runs carry no driver-process tag: they outlive this command, and a later drive must not take
them for the runs of a killed driver (`llm_assets.killed_drivers`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import BaseWorkspaceRequestContext, WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

from llm_assets.runner import RUN_TAG, _partition_keys, plan_waves, register_shards, resolve_selection
from llm_assets.settings import PROJECT_ROOT

# The loadable target of workspace.yaml and of the Helm chart's user deployment.
DEFINITIONS_MODULE, DEFINITIONS_ATTRIBUTE = "llm_assets.definitions", "defs"
SUBMITTED = "submit"  # RUN_TAG's value on submitted runs


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    assets: list[str]
    partition: str | None
    status: str  # as the instance reported it once the wave was done with (QUEUED, STARTING, SUCCESS, ...)


@dataclass
class SubmitResult:
    runs: list[SubmittedRun] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)  # runs of a wave that did not succeed: the drive stopped
    source_problems: list[str] = field(default_factory=list)  # sources skipped (on_source_error: skip)

    @property
    def success(self) -> bool:
        return not self.failed_runs and not self.source_problems


@contextmanager
def code_location_workspace(instance: dg.DagsterInstance, location_name: str) -> Iterator[BaseWorkspaceRequestContext]:
    """The project's Definitions as a code location named `location_name`, loaded in this process.

    Runs created from it carry the python origin `python -m dagster api execute_run` needs in a
    run pod (this module and attribute, run with the image's interpreter) and, when the Helm chart
    started this process, the image it names in $DAGSTER_CURRENT_IMAGE.
    """
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE,
                             attribute=DEFINITIONS_ATTRIBUTE, working_directory=str(PROJECT_ROOT)),
        container_image=os.environ.get("DAGSTER_CURRENT_IMAGE"), location_name=location_name)
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as process:
        workspace = process.create_request_context()
        error = workspace.get_code_location_error(location_name)
        if error is not None:
            raise RuntimeError(f"{DEFINITIONS_MODULE}:{DEFINITIONS_ATTRIBUTE} did not load: {error.message}")
        yield workspace


def create_run(instance: dg.DagsterInstance, location: CodeLocation, wave: Sequence[dg.AssetKey],
               partition_tags: dict[str, str]) -> dg.DagsterRun:
    """A NOT_STARTED run of `wave` (its assets and their checks) for the partition its tags name
    (none: unpartitioned), with the execution plan and origins a run launcher needs."""
    (repository,) = location.get_repositories().values()
    checks = {check for key in wave for check in repository.asset_graph.get(key).check_keys}
    job = location.get_job(JobSubsetSelector(
        location_name=location.name, repository_name=repository.name, job_name=IMPLICIT_ASSET_JOB_NAME,
        op_selection=None, asset_selection=wave, asset_check_selection=checks))
    tags = {**job.tags, RUN_TAG: SUBMITTED, **partition_tags}
    plan = location.get_execution_plan(job, {}, step_keys_to_execute=None, known_state=None, instance=instance)
    return instance.create_run(
        job_name=job.name, run_id=None, run_config={}, resolved_op_selection=job.resolved_op_selection,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute, op_selection=None,
        status=None, root_run_id=None, parent_run_id=None, tags=tags, job_snapshot=job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot, parent_job_snapshot=job.parent_job_snapshot,
        remote_job_origin=job.get_remote_origin(), job_code_origin=job.get_python_origin(),
        asset_selection=frozenset(wave), asset_check_selection=frozenset(checks),
        asset_graph=repository.asset_graph,
    )


def wait_for_runs(instance: dg.DagsterInstance, run_ids: Sequence[str], poll_seconds: float) -> list[dg.DagsterRun]:
    """The runs, once every one of them has finished (succeeded, failed or been canceled)."""
    while True:
        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        if all(run.is_finished for run in runs):
            return runs
        time.sleep(poll_seconds)


def submit_graph(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    workspace: BaseWorkspaceRequestContext,
    location_name: str,
    selection: str | None = None,
    partitions: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    poll_seconds: float = 10.0,
) -> SubmitResult:
    """Submit the selection (default: everything) wave by wave through the instance's run
    coordinator; `partitions` narrows the waves partitioned by those keys, as the driver does."""
    asset_graph = defs.resolve_asset_graph()
    selected = resolve_selection(asset_graph, selection)
    shards = register_shards(defs, instance, log)
    location = workspace.get_code_location(location_name)
    result = SubmitResult(source_problems=[p.message for p in shards.problems])
    waves = plan_waves(asset_graph, selected)
    for number, wave in enumerate(waves, start=1):
        keys = [k for k in _partition_keys(asset_graph, instance, wave, partitions) if k not in shards.skipped]
        partitions_def = asset_graph.get(wave[0]).partitions_def
        run_ids = []
        for key in keys:
            tags = dict(partitions_def.get_tags_for_partition_key(str(key))) if partitions_def else {}
            run = instance.submit_run(create_run(instance, location, wave, tags).run_id, workspace)
            run_ids.append(run.run_id)
        names = ", ".join(k.to_user_string() for k in wave)
        log(f"wave {number}/{len(waves)} [{names}]: {len(run_ids)} run(s) submitted")
        # The last wave is left to the cluster; an earlier one must succeed before its downstream
        # starts. Interrupting the wait stops the submission, not the runs.
        if number < len(waves):
            log(f"  waiting for them to finish before wave {number + 1} (runs tagged {RUN_TAG}={SUBMITTED})")
            runs = wait_for_runs(instance, run_ids, poll_seconds)
        else:
            runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        for key, run in zip(keys, runs, strict=True):
            result.runs.append(SubmittedRun(run.run_id, [k.to_user_string() for k in wave],
                                            str(key) if key is not None else None, run.status.value))
        result.failed_runs = [run.run_id for run in runs if run.is_finished and not run.is_success]
        if result.failed_runs:
            log(f"wave {number} did not succeed: {len(result.failed_runs)} failed run(s); later waves not submitted")
            break
    return result
