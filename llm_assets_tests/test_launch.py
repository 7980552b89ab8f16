"""The workers' message reader reads every message written before the session closed."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import dagster as dg

from llm_assets.launch import DrainingFileMessageReader


class Collected:
    """A Pipes message handler that keeps what it is handed."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def handle_message(self, message: dict) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin: str, exc_info) -> None:
        raise AssertionError(f"{origin}: {exc_info[1]}")


def message(n: int) -> str:
    return json.dumps({"__dagster_pipes_version": "0.1", "method": "log", "params": {"n": n}}) + "\n"


def test_lines_written_just_before_the_session_closes_are_read_and_a_torn_last_line_is_not(tmp_path: Path) -> None:
    handler = Collected()
    reader = DrainingFileMessageReader()
    with reader.read_messages(handler) as params:
        path = Path(params["path"])
        with open(path, "a", encoding="utf-8") as out:
            out.write(message(0))
            out.flush()
            deadline = time.time() + 10
            while not handler.messages and time.time() < deadline:  # the reader is tailing the file
                time.sleep(0.01)
            # The worker's last messages and its exit, with no pause for the reader to find them
            # before the session closes: Dagster's own reader may stop without them.
            out.write(message(1) + message(2) + message(3)[:-10])
    assert [m["params"]["n"] for m in handler.messages] == [0, 1, 2]


def test_a_line_being_written_is_read_once_whole(tmp_path: Path) -> None:
    handler = Collected()
    with DrainingFileMessageReader().read_messages(handler) as params:
        line = message(7)
        with open(params["path"], "a", encoding="utf-8") as out:
            out.write(line[:5])
            out.flush()
            time.sleep(0.1)  # the reader meets half a line
            out.write(line[5:])
    assert [m["params"]["n"] for m in handler.messages] == [7]


def test_a_worker_under_pipes_reports_through_it() -> None:
    @dg.asset
    def reported(context, client: dg.PipesSubprocessClient):  # Dagster reads the annotations: none postponed here
        script = ("from dagster_pipes import open_dagster_pipes\n"
                  "with open_dagster_pipes() as pipes:\n"
                  "    pipes.report_asset_materialization(metadata={'answer': 42})\n")
        return client.run(context=context, command=[sys.executable, "-c", script]).get_materialize_result()

    client = dg.PipesSubprocessClient(message_reader=DrainingFileMessageReader())
    for _ in range(5):
        result = dg.materialize([reported], resources={"client": client})
        assert result.asset_materializations_for_node("reported")[0].metadata["answer"].value == 42
    assert threading.active_count() < 20  # each session's reader thread ended with it
