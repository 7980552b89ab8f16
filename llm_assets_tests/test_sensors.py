"""The alert cursor's bookkeeping, without a Dagster instance."""

from __future__ import annotations

from llm_assets.sensors import AlertCursor, settle_check_executions


def test_a_check_still_planned_holds_the_watermark_until_it_settles():
    cursor = AlertCursor(check_watermark=4)
    executions = [(5, "slow-run", "PLANNED"), (6, "run-a", "FAILED"), (7, "run-a", "SUCCEEDED")]
    to_send, cursor = settle_check_executions(executions, cursor, {"slow-run": False})
    assert to_send == [6]
    assert cursor.check_watermark == 4 and cursor.checks_sent == [6, 7]

    # The slow run's check fails later: it is sent now, and 6 is not sent again.
    executions = [(5, "slow-run", "FAILED"), (6, "run-a", "FAILED"), (7, "run-a", "SUCCEEDED")]
    to_send, cursor = settle_check_executions(executions, cursor, {})
    assert to_send == [5]
    assert cursor.check_watermark == 7 and cursor.checks_sent == []


def test_a_planned_check_of_a_finished_run_does_not_hold_the_watermark_forever():
    executions = [(3, "crashed", "PLANNED"), (4, "run-a", "FAILED")]
    to_send, cursor = settle_check_executions(executions, AlertCursor(), {"crashed": True})
    assert to_send == [4]
    assert cursor.check_watermark == 4 and cursor.checks_sent == []


def test_the_cursor_round_trips():
    cursor = AlertCursor(check_watermark=9, checks_sent=[11, 12], runs="abc")
    assert AlertCursor.parse(cursor.dump()) == cursor
    assert AlertCursor.parse(None) == AlertCursor()
