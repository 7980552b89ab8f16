"""The loop's AutomationConditions (docs/monitoring.md): declarative, evaluated by Dagster's
AutomationConditionSensor under the daemon, or once by `llm-assets automate --once`."""

import dagster as dg


def after_update(trigger: dg.AssetsDefinition | dg.AssetKey) -> dg.AutomationCondition:
    """Run once `trigger` (one of the asset's dependencies) has a new materialization, when every
    dependency is there and passed its blocking checks and nothing is in progress. Updates of the
    other dependencies do not trigger it (a new release does not redo every traffic window)."""
    key = trigger.key if isinstance(trigger, dg.AssetsDefinition) else trigger
    landed = dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(key))
    return (landed.since_last_handled().with_label(f"{key.to_user_string()} updated")
            & dg.AutomationCondition.all_deps_blocking_checks_passed()
            & ~dg.AutomationCondition.any_deps_missing() & ~dg.AutomationCondition.any_deps_in_progress()
            & ~dg.AutomationCondition.in_progress())


def retrain_condition(drift_gates: dg.AssetChecksDefinition,
                      feedback_backlog: dg.AssetChecksDefinition) -> dg.AutomationCondition:
    """When feedback_dataset (so the fine-tune after it) runs for a size: a drift report of new
    traffic was just judged and its drift gate failed, or the feedback backlog reached the
    threshold; every other blocking check of its inputs passed; nothing upstream still running.
    Only a check that newly failed, in some window, fires it: a tick with no new traffic, or with new
    traffic that passes, requests nothing."""
    triggers = dg.AssetSelection.checks(drift_gates, feedback_backlog)
    # Per window. A check's `newly_updated` is not: any new evaluation marks every window of the
    # check updated, so a passing window would wake an earlier window's failure.
    judged_failing = dg.AutomationCondition.any_deps_match(dg.AutomationCondition.any_checks_match(
        dg.AutomationCondition.check_failed().newly_true()).allow(triggers))
    # all_deps_blocking_checks_passed, except the drift gate: its failure is the trigger, not a stop.
    others_passed = dg.AutomationCondition.all_deps_match(dg.AutomationCondition.all_checks_match(
        dg.AutomationCondition.check_passed() | dg.AutomationCondition.will_be_requested(), blocking_only=True,
    ).ignore(dg.AssetSelection.checks(drift_gates)))
    return (judged_failing.since_last_handled().with_label("new traffic judged: drift or feedback")
            & others_passed.with_label("all_deps_blocking_checks_passed (but the drift gate)")
            & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())
