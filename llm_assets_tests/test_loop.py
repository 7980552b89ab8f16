"""The loop, end to end, on a real instance and a real server on 127.0.0.1: the current release serves
shifted traffic with feedback; `automate --once` ingests it, fails the drift gate and fine-tunes from
the release on the feedback; the fine-tune clears the eval gates and is proposed as the candidate; the
server answers a share of the traffic with it (and is killed with SIGKILL mid-traffic, losing no
acknowledged record); when its windows land, `canary_report` promotes it, and that traffic, in
distribution, retrains nothing. Then feedback filled with junk gives a candidate whose eval gate
fails: it is never proposed, and the alert sink receives the failed check."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from llm_assets.cli import main
from llm_assets.release_pointer import candidate_release, current_release, read_release
from llm_assets.serving.records import DurableLog
from llm_assets.serving.server import routes_to_candidate
from llm_assets.store import open_store
from llm_assets_tests.monitoring.conftest import IN_DISTRIBUTION, SHIFTED
from llm_assets_tests.posttrain.test_assets import ONE_BATCH_EVALUATION
from llm_assets_tests.release.test_rollback_lock_replay import with_sft_and_release
from llm_assets_tests.serving.conftest import server_url

pytestmark = pytest.mark.slow

SIZE, FRACTION = "xs", 0.5
PROMPT_CHARS = 36  # the test model's context is 64 tokens of a 320-token (mostly byte) vocabulary


def loop_manifest(manifest_path: Path, log_dir: Path) -> None:
    """The release tests' graph (pretraining, SFT, evaluation, release of one tiny size) with the loop:
    minute traffic windows (a test cannot wait an hour for one to close), a canary of half the
    requests, a fine-tune on the feedback, and a bits-per-byte gate relative to the current release.
    Each of the loop's evaluations answers the safety prompts in one batch: most of an evaluation's time."""
    manifest = with_sft_and_release(manifest_path, ONE_BATCH_EVALUATION)
    manifest["stages"]["serving"]["canary"] = {"fraction": FRACTION, "log_dir": str(log_dir)}
    manifest["stages"]["monitoring"] = {
        "log_dir": str(log_dir), "partitions": "minutely", "start": datetime.now(UTC).strftime("%Y-%m-%d"),
        "reference_docs": 60, "max_prompts": 32, "max_tokens": 64, "retrain_feedback": 1000,
        "fine_tune": {"sft": {"steps": 8, "batch_size": 4, "learning_rate": 3e-3, "max_length": 96,
                              "checkpoint_every": 0}}}
    manifest["gates"].update({
        "drift.js_divergence": {"max": 0.25},
        "heldout_perplexity.bits_per_byte": {"max": 8.0, "baseline": "release", "max_delta": 0.1},
        "canary.candidate_requests": {"min": 4}, "canary.error_rate_increase": {"max": 0.05}})
    manifest_path.write_text(yaml.safe_dump(manifest))


@contextmanager
def serving(cli: list[str], log_dir: Path, out: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`llm-assets serve` of the size's current release in a subprocess, on a port the OS picks."""
    with out.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_assets.cli", *cli, "serve", "--port", "0", "--log-dir", str(log_dir),
             "--log-prompts", *extra], stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        yield server_url(process, out, timeout_s=180), process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # a clean stop closes the log files
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def post(url: str, path: str, body: dict, request_id: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"x-request-id": request_id} if request_id else {})}
    request = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{path} answered {exc.code}: {exc.read().decode()[:500]}") from None


def post_unless_killed(url: str, path: str, body: dict) -> dict | None:
    """The answer, or None when the server died before it answered (not acknowledged)."""
    try:
        return post(url, path, body)
    except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError):
        return None


def traffic(url: str, prompts: list[str], feedback) -> int:
    """Each prompt answered, and rated as `feedback(prompt, answer)` says ((rating, correction) or None)."""
    rated = 0
    for i, prompt in enumerate(prompts):
        answer = post(url, "/v1/completions", {"prompt": prompt[:PROMPT_CHARS], "max_tokens": 8, "temperature": 0})
        verdict = feedback(prompt, answer["choices"][0]["text"])
        if verdict is not None:
            rating, correction = verdict
            post(url, "/v1/feedback", {"id": answer["id"], "rating": rating,
                                       **({"correction": correction} if correction else {})})
            rated += 1
    return rated


def next_minute() -> None:
    """Sleep into the next minute: the window of the traffic just sent is then complete."""
    time.sleep(61 - datetime.now(UTC).second)


def automate(cli: list[str], capsys) -> tuple[int, str]:
    code = main([*cli, "automate", "--once"])
    return code, capsys.readouterr().out


def ran(output: str) -> list[str]:
    """The assets `automate --once` ran, in order (their partitions left out)."""
    return [re.sub(r"\[.*\]$", "", line.split()[1]) for line in output.splitlines()
            if line.startswith(("ok    ", "FAILED"))]


def test_the_loop_fine_tunes_gates_canaries_and_promotes(
        settings, manifest_path, tmp_path, monkeypatch, capsys):
    log_dir, alerts = tmp_path / "serve-logs", Path(settings.alerts_jsonl)
    loop_manifest(manifest_path, log_dir)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLM_ASSETS_STORE", settings.store_uri)
    monkeypatch.setenv("LLM_ASSETS_ALERTS_JSONL", settings.alerts_jsonl)
    cli, store = ["--manifest", settings.manifest], open_store(settings.store_uri)

    assert main([*cli, "materialize"]) == 0
    first = current_release(store, SIZE)
    assert first is not None
    code, out = automate(cli, capsys)
    assert (code, ran(out)) == (0, []), out

    # Round 1: traffic the model never saw (other languages, SQL), liked, some of it corrected.
    with serving(cli, log_dir, tmp_path / "serve-1.log") as (url, _):
        assert traffic(url, SHIFTED, lambda p, a: (1, None) if len(p) % 3 else (-1, a.strip() + " (checked)")) > 0
    next_minute()
    code, out = automate(cli, capsys)
    assert code == 1 and "drift_report:drift_gates" in out, out  # the failed gate that starts the loop
    assert ran(out) == ["serving_traffic", "drift_report", "feedback_dataset", "feedback_model",
                        "feedback_eval_report", "feedback_release"], out
    candidate = candidate_release(store, SIZE)
    assert candidate not in (None, first) and current_release(store, SIZE) == first
    assert read_release(store, candidate)["fine_tuned_from"] == first
    assert any(json.loads(line).get("check") == "drift_gates" for line in alerts.read_text().splitlines())

    # The canary: half the requests (by request id) answered by the candidate; the server is killed
    # mid-traffic and loses no record it acknowledged.
    ids = [f"canary-{i}" for i in range(24)]
    assert sum(routes_to_candidate(i, FRACTION) for i in ids) >= 6
    acknowledged: dict[str, set[str]] = {"requests": set(), "feedback": set()}
    with serving(cli, log_dir, tmp_path / "serve-2.log", "--candidate", "proposed") as (url, process):
        for request_id, prompt in zip(ids, IN_DISTRIBUTION * 3, strict=False):
            answer = post(url, "/v1/completions", {"prompt": prompt[:PROMPT_CHARS], "max_tokens": 8}, request_id)
            acknowledged["requests"].add(answer["id"])
            acknowledged["feedback"].add(post(url, "/v1/feedback", {"id": answer["id"], "rating": 1})["id"])
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                answer = post_unless_killed(url, "/v1/completions", {"prompt": "Return the", "max_tokens": 8})
                if answer is not None:
                    acknowledged["requests"].add(answer["id"])

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stop.set()
        for thread in clients:
            thread.join(timeout=35)
    for kind, ids_acknowledged in acknowledged.items():
        log = DurableLog(log_dir, kind)
        log.open()  # closes what the killed server left open
        log.close()
        logged = {json.loads(line)["id"] for path in log.closed_files() for line in path.read_text().splitlines()}
        assert ids_acknowledged <= logged, f"{kind}: acknowledged but not logged: {ids_acknowledged - logged}"

    # The canary's windows land: canary_report judges and promotes the candidate. That traffic was
    # in distribution: it passes the drift gate and retrains nothing.
    next_minute()
    code, out = automate(cli, capsys)
    assert code == 0 and set(ran(out)) == {"serving_traffic", "drift_report", "canary_report"}, out
    assert current_release(store, SIZE) == candidate
    assert main([*cli, "releases"]) == 0
    chain = [line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:] if line.startswith(SIZE)]
    assert chain == [[first[:12], "promote"], [candidate[:12], "candidate"], [candidate[:12], "promote"]], chain

    # Round 2: drifted traffic whose "corrections" a bot filled with encoded junk. The fine-tune on
    # it loses bits per byte on the held-out documents beyond the gate against the current release:
    # the candidate is never proposed, and the alert says which check failed.
    junk = random.Random(0)
    with serving(cli, log_dir, tmp_path / "serve-3.log") as (url, _):
        traffic(url, SHIFTED * 6, lambda p, a: (-1, "".join(junk.choices(string.ascii_letters + string.digits + "+/",
                                                                         k=60))))
    next_minute()
    code, out = automate(cli, capsys)
    assert code == 1 and "feedback_eval_report:eval_gates" in out, out
    assert ran(out)[-1] == "feedback_eval_report" and "feedback_release" not in ran(out), out
    assert current_release(store, SIZE) == candidate and candidate_release(store, SIZE) is None
    assert any(json.loads(line).get("check") == "eval_gates" for line in alerts.read_text().splitlines())
