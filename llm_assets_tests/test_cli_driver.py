"""The embedded driver as a user meets it: a `kill -9` of `llm-assets materialize` is recovered by
the next one, and check failures (WARN included) are summarized on the command line and alerted
without the daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from llm_assets.cli import EXIT_FAILED, EXIT_OK, main
from llm_assets.killed_drivers import (
    DRIVER_PROCESS_TAG,
    IN_PROGRESS,
    STALE_STAGING_MARGIN_S,
    driver_is_gone,
    driver_process,
)
from llm_assets.settings import prepare_dagster_home


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def local_source(manifest_path: Path, folder: Path) -> None:
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"] = [{"kind": "local", "name": "web", "paths": [f"{folder}/*"]}]
    manifest_path.write_text(yaml.safe_dump(manifest))


@pytest.fixture
def cli_env(tmp_path, manifest_path, monkeypatch) -> dict[str, str]:
    """The environment `llm-assets` reads, everything under tmp_path (restored afterwards)."""
    env = {
        "DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "dagster_home")),
        "LLM_ASSETS_STORE": str(tmp_path / "artifacts"),
        "LLM_ASSETS_MANIFEST": str(manifest_path),
        "LLM_ASSETS_ALERTS_JSONL": str(tmp_path / "alerts.jsonl"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLM_ASSETS_ALERT_WEBHOOK_URL", raising=False)
    return env


def test_driver_is_gone_only_when_its_process_certainly_is(tmp_path):
    assert not driver_is_gone(driver_process()), "this very process"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    host, _, _ = driver_process().rsplit(":", 2)
    child.wait()
    assert driver_is_gone(f"{host}:{child.pid}:")
    host, pid, start = driver_process().rsplit(":", 2)
    if start:  # /proc tells a reused pid by its start time
        assert driver_is_gone(f"{host}:{pid}:{int(start) + 1}")
    assert not driver_is_gone(f"another-host.example:{child.pid}:"), "another host's driver cannot be judged"
    assert not driver_is_gone("garbage")


def _in_progress(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(statuses=list(IN_PROGRESS))))


@pytest.mark.timeout(120)
def test_kill_9_of_materialize_is_marked_failed_and_its_staging_removed(tmp_path, manifest_path, cli_env):
    # One large JSONL file: its raw_corpus build runs long enough to be caught writing.
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "big.jsonl", "w") as handle:
        for i in range(300_000):
            handle.write(f'{{"text": "document number {i} of the big file"}}\n')
    local_source(manifest_path, folder)
    staging = Path(cli_env["LLM_ASSETS_STORE"]) / "tmp"
    cmd = [sys.executable, "-m", "llm_assets.cli", "materialize", "--select", "key:raw_corpus"]
    env = {**os.environ, **cli_env}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    with dg.DagsterInstance.from_config(cli_env["DAGSTER_HOME"]) as instance:
        try:
            deadline = time.time() + 90
            while not (staging.is_dir() and any(staging.iterdir()) and _in_progress(instance)):
                assert proc.poll() is None, "materialize ended before it could be killed"
                assert time.time() < deadline, "no run started writing in time"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        [killed] = _in_progress(instance)
        assert killed.status == dg.DagsterRunStatus.STARTED and DRIVER_PROCESS_TAG in killed.tags
        litter = list(staging.iterdir())
        assert litter, "the killed writer left its staging folder"

        # A live writer touches its folder every 30 s, so a folder is debris once untouched for twice
        # that: instead of waiting a minute, the debris is made ten minutes old.
        old = time.time() - STALE_STAGING_MARGIN_S - 600
        for root, dirs, files in os.walk(staging):
            for name in [*dirs, *files]:
                os.utime(os.path.join(root, name), (old, old))
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"run {killed.run_id} was left STARTED by a killed driver" in second.stdout
        assert "staging folder(s) left by killed writers" in second.stdout

        assert _in_progress(instance) == []
        run = instance.get_run_by_id(killed.run_id)
        assert run.status == dg.DagsterRunStatus.FAILURE
        failure = instance.get_records_for_run(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert "was killed before the run finished" in failure[0].event_log_entry.message
    assert list(staging.iterdir()) == [], "no staging litter after the second run"
    assert "raw_corpus" in second.stdout and "1 materialization(s)" in second.stdout
    # Its driver sent the killed run's alerts (the alert sensor leaves such runs to the driver).
    alerts = read_jsonl(Path(cli_env["LLM_ASSETS_ALERTS_JSONL"]))
    assert [a["run_id"] for a in alerts if a["kind"] == "run_failed"] == [killed.run_id]


def test_warn_failures_are_summarized_and_alerted_without_the_daemon(tmp_path, manifest_path, cli_env, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.jsonl").write_text(json.dumps({"text": "a perfectly good document"}) + "\n")
    (folder / "empty.txt").write_text("")
    (folder / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 50)
    local_source(manifest_path, folder)

    assert main(["materialize", "--select", "key:raw_corpus"]) == EXIT_OK  # WARN does not fail the drive
    out = capsys.readouterr().out
    lines = out.splitlines()
    summary = lines[next(i for i, line in enumerate(lines) if line.endswith("check(s) did not pass:")):]
    assert summary[0] == "2 check(s) did not pass:"
    rows = sorted(line.split(maxsplit=3) for line in summary[1:3])
    assert rows == [
        ["WARN", "raw_corpus[web-blob.txt]", "raw_schema_and_content", "raw_corpus[web-blob.txt]: no documents"],
        ["WARN", "raw_corpus[web-empty.txt]", "raw_schema_and_content", "raw_corpus[web-empty.txt]: no documents"],
    ]

    alerts = read_jsonl(Path(cli_env["LLM_ASSETS_ALERTS_JSONL"]))
    assert sorted((a["kind"], a["asset"], a["partition"], a["check"], a["severity"]) for a in alerts) == [
        ("check_failed", "raw_corpus", "web-blob.txt", "raw_schema_and_content", "WARN"),
        ("check_failed", "raw_corpus", "web-empty.txt", "raw_schema_and_content", "WARN"),
    ]
    assert all(a["description"].endswith(": no documents") for a in alerts)

    # verify runs the checks again: the same summary, and a non-zero exit.
    assert main(["verify"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "2 check(s) did not pass:" in captured.out and "raw_corpus[web-empty.txt]" in captured.out
    assert len(read_jsonl(Path(cli_env["LLM_ASSETS_ALERTS_JSONL"]))) == 4, "verify's runs alert too"
