"""The durable request and feedback logs: rotation, recovery after a kill, and a real server killed
with SIGKILL mid-traffic losing no record it acknowledged."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm_assets.serving.records import DurableLog
from llm_assets_tests.serving.conftest import API_KEY, server_url

NAME = re.compile(r"^requests-\d{8}T\d{6}\.\d{6}Z\.jsonl$")


def lines(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def test_files_rotate_by_size_into_closed_immutable_files(tmp_path: Path) -> None:
    log = DurableLog(tmp_path, "requests", max_bytes=200)
    log.open()
    for i in range(10):
        log.append({"id": i, "pad": "x" * 40}).result(timeout=5)  # resolved: on disk
    closed = log.closed_files()
    assert len(closed) >= 3 and all(NAME.match(p.name) and p.stat().st_size <= 200 for p in closed)
    assert len(list(tmp_path.glob("*.jsonl.open"))) == 1  # the file being written is told apart
    log.close()
    assert not list(tmp_path.glob("*.jsonl.open"))
    assert [r["id"] for r in lines(log.closed_files())] == list(range(10))


def test_an_idle_file_is_closed_when_it_is_due_by_age(tmp_path: Path) -> None:
    log = DurableLog(tmp_path, "feedback", max_age_s=0.2)
    log.open()
    log.append({"id": 1}).result(timeout=5)
    time.sleep(0.6)  # no further record comes: the reader must not wait for traffic
    assert len(log.closed_files()) == 1 and not list(tmp_path.glob("*.open"))
    log.close()


def test_opening_closes_what_a_killed_server_left_and_drops_its_torn_line(tmp_path: Path) -> None:
    left = tmp_path / "requests-20260101T000000.000000Z.jsonl.open"
    left.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "comp')  # killed in the middle of a write
    log = DurableLog(tmp_path, "requests")
    log.open()
    assert [p.name for p in log.closed_files()] == ["requests-20260101T000000.000000Z.jsonl"]
    assert lines(log.closed_files()) == [{"id": 1}, {"id": 2}]
    log.close()


def test_a_record_that_could_not_be_written_is_not_acknowledged(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    log = DurableLog(tmp_path, "requests")
    log.open()

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match=f"could not write the requests log in {re.escape(str(tmp_path))}"):
        log.append({"id": 1}).result(timeout=5)
    monkeypatch.undo()
    log.close()


SERVER = """
import sys
from pathlib import Path
from llm_assets.serving import ServeConfig, serve
serve(Path(sys.argv[1]), sys.argv[2], port=0, config=ServeConfig(api_key=sys.argv[4], log_dir=Path(sys.argv[3])))
"""


def test_a_server_killed_mid_traffic_loses_no_acknowledged_record(model_artifact, tmp_path: Path) -> None:
    model_dir, sha256 = model_artifact
    log_dir = tmp_path / "logs"
    server_log = tmp_path / "server.log"
    with server_log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-c", SERVER, str(model_dir), sha256, str(log_dir), API_KEY],
                                   stderr=sink, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        url = server_url(process, server_log)

        acknowledged: dict[str, set[str]] = {"requests": set(), "feedback": set()}
        stop = threading.Event()

        def post(path: str, body: dict) -> dict | None:
            request = urllib.request.Request(url + path, json.dumps(body).encode(), {
                "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return None  # killed before it answered: not acknowledged

        def client() -> None:
            while not stop.is_set():
                answer = post("/v1/completions", {"prompt": "Return the", "max_tokens": 8})
                if answer is None:
                    continue
                acknowledged["requests"].add(answer["id"])
                rated = post("/v1/feedback", {"id": answer["id"], "rating": 1})
                if rated is not None:
                    acknowledged["feedback"].add(rated["id"])

        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged["feedback"]) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the first requests also warm the model up
        time.sleep(1.0)  # then traffic in full flow, and the kill lands in the middle of it
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stop.set()
        for thread in clients:
            thread.join(timeout=15)
    finally:
        process.kill()
    assert len(acknowledged["feedback"]) >= 5, server_log.read_text()[-2000:]
    for kind, ids in acknowledged.items():
        log = DurableLog(log_dir, kind)
        log.open()  # closes what the killed server left open
        log.close()
        assert ids <= {r["id"] for r in lines(log.closed_files())}, f"acknowledged {kind} records were lost"
