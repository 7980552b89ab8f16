"""The retrain condition on a real instance, without the heavy work: a per-(size, window) report with
a blocking drift check, and a per-size dataset under `retrain_condition`. Only a window whose drift
check newly failed requests the dataset; a tick with nothing new, or with a new window that passes,
requests nothing (an earlier window's failure is not woken up again)."""

import dagster as dg

from llm_assets.monitoring.conditions import retrain_condition

SIZES = dg.StaticPartitionsDefinition(["xs", "s"])
BY_SIZE_AND_WINDOW = dg.MultiPartitionsDefinition(
    {"size": SIZES, "window": dg.StaticPartitionsDefinition(["w1", "w2", "w3", "w4"])})
FAILING = {"w1", "w3"}  # the windows whose served prompts drifted


@dg.asset(partitions_def=BY_SIZE_AND_WINDOW)
def drift_report() -> None:
    """Stands for one window's drift figures."""


@dg.asset_check(asset=drift_report, blocking=True, partitions_def=BY_SIZE_AND_WINDOW)
def drift_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=context.partition_key.keys_by_dimension["window"] not in FAILING)


@dg.asset_check(asset=drift_report, blocking=False, partitions_def=BY_SIZE_AND_WINDOW)
def feedback_backlog() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN)


@dg.asset(partitions_def=SIZES, automation_condition=retrain_condition(drift_gates, feedback_backlog),
          deps=[dg.AssetDep(drift_report, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("size"))])
def feedback_dataset() -> None:
    """Stands for the fine-tune chain's first step."""


def test_only_a_newly_failed_window_requests_the_fine_tune() -> None:
    instance = dg.DagsterInstance.ephemeral()
    defs = dg.Definitions(assets=[drift_report, feedback_dataset], asset_checks=[drift_gates, feedback_backlog])
    cursor = None

    def land(size: str, window: str) -> None:
        key = dg.MultiPartitionKey({"size": size, "window": window})
        # A failed blocking check fails the run; its evaluation is recorded all the same.
        dg.materialize([drift_report, drift_gates, feedback_backlog], partition_key=key, instance=instance,
                       raise_on_error=False)

    def tick() -> set[str]:
        nonlocal cursor
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        return set(result.get_requested_partitions(feedback_dataset.key))

    assert tick() == set()
    land("xs", "w1")  # drifted
    assert tick() == {"xs"}
    assert tick() == set()  # nothing new
    land("xs", "w2")  # in distribution: the earlier failure is not woken up
    assert tick() == set()
    land("s", "w2")
    land("xs", "w3")  # drifted again, in one size
    assert tick() == {"xs"}
    land("xs", "w1")  # a rerun of a window that still fails is not new traffic
    land("xs", "w4")
    assert tick() == set()
