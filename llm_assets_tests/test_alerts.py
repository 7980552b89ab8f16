"""Alerts: failed checks (warn and error) and failed runs reach the JSONL file and a webhook, once."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph, run_checks
from llm_assets.sensors import alert_sensor
from llm_assets.store import open_store
from llm_assets_tests.store.test_store import flip_byte
from resources.alert_sinks import AlertDeliveryError

RAW = dg.AssetKey("raw_corpus")


class Receiver:
    """A real HTTP server on 127.0.0.1 that records webhook posts (or refuses them)."""

    def __init__(self):
        self.posts: list[dict] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.status == 200:
                    outer.posts.append(json.loads(body))
                self.send_response(outer.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@dg.asset_check(asset=RAW, name="too_few_documents",
                description="A non-blocking WARN check that always has an opinion.")
def too_few_documents() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, severity=dg.AssetCheckSeverity.WARN,
        metadata={"documents": 3, "threshold": 10}, description="3 documents < 10",
    )


# The generic machinery needs only the first chain; tests of the whole graph live elsewhere.
CHAIN = "key:raw_corpus or key:corpus_inventory"


def tick(defs: dg.Definitions, instance, cursor: str | None) -> tuple[dg.SkipReason, str | None]:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources={"alert_sinks": defs.resources["alert_sinks"]}
    )
    result = alert_sensor(context)
    return result, context.cursor


def read_jsonl(path) -> list[dict]:
    try:
        return [json.loads(line) for line in open(path)]
    except FileNotFoundError:
        return []


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture
def alert_defs(settings, receiver):
    base = build_definitions(replace(settings, alert_webhook_url=receiver.url))
    return dg.Definitions.merge(base, dg.Definitions(asset_checks=[too_few_documents]))


def test_failed_checks_and_runs_are_sent_once(alert_defs, instance, settings, receiver):
    _, cursor = tick(alert_defs, instance, None)
    assert read_jsonl(settings.alerts_jsonl) == []

    # A clean drive still trips the WARN check: the run stays green, the alert still fires.
    assert materialize_graph(alert_defs, instance, selection=CHAIN, log=lambda _: None).success
    shard = instance.get_dynamic_partitions("corpus_shards")[0]
    sha = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RAW, asset_partitions=[shard]), limit=1
    ).records[0].asset_materialization.metadata["sha256"].value
    flip_byte(open_store(settings.store_uri), sha, "shard.parquet", offset=10)
    failed = run_checks(alert_defs, instance, [RAW], shard)
    assert not failed.success

    result, cursor = tick(alert_defs, instance, cursor)
    alerts = read_jsonl(settings.alerts_jsonl)
    warn = [a for a in alerts if a["check"] == "too_few_documents"]
    error = [a for a in alerts if a["check"] == "artifact_integrity"]
    runs = [a for a in alerts if a["kind"] == "run_failed"]
    n_shards = len(instance.get_dynamic_partitions("corpus_shards"))
    # The WARN check ran once per shard in the drive, and once more in the check-only run.
    assert len(warn) == n_shards + 1 and {a["severity"] for a in warn} == {"WARN"}
    assert warn[0]["metadata"] == {"documents": "3", "threshold": "10"}
    assert len(error) == 1 and error[0]["severity"] == "ERROR" and error[0]["partition"] == shard
    assert "shard.parquet: sha256" in error[0]["description"] and error[0]["asset"] == "raw_corpus"
    assert [a["run_id"] for a in runs] == [failed.run_id]
    assert len(receiver.posts) == len(alerts)
    assert any("artifact_integrity" in p["text"] and "shard.parquet" in p["text"] for p in receiver.posts)
    assert "sent" in result.skip_message

    # Nothing new: nothing sent again.
    _, cursor = tick(alert_defs, instance, cursor)
    assert len(read_jsonl(settings.alerts_jsonl)) == len(alerts)
    assert len(receiver.posts) == len(alerts)


def test_a_down_webhook_keeps_the_cursor_and_the_file_has_no_duplicates(alert_defs, instance, settings, receiver):
    _, cursor = tick(alert_defs, instance, None)
    assert materialize_graph(alert_defs, instance, selection=CHAIN, log=lambda _: None).success
    receiver.status = 503
    with pytest.raises(AlertDeliveryError, match="webhook rejected"):
        tick(alert_defs, instance, cursor)
    written = read_jsonl(settings.alerts_jsonl)
    assert written and receiver.posts == []

    receiver.status = 200
    _, cursor = tick(alert_defs, instance, cursor)  # the same cursor: the failed tick did not advance it
    assert len(receiver.posts) == len(written)
    assert len(read_jsonl(settings.alerts_jsonl)) == len(written), "the file did not get duplicates"


def test_the_driver_alerts_its_own_runs_and_the_sensor_does_not_send_them_again(
    alert_defs, instance, settings, receiver
):
    _, cursor = tick(alert_defs, instance, None)
    sinks = alert_defs.resources["alert_sinks"]
    result = materialize_graph(alert_defs, instance, selection=CHAIN, log=lambda _: None, alert_sinks=sinks)
    assert result.success
    shards = instance.get_dynamic_partitions("corpus_shards")
    # Sent as each run ended, formatted as the sensor formats them (ids included); no daemon ticked.
    alerts = read_jsonl(settings.alerts_jsonl)
    assert [(a["kind"], a["check"], a["severity"]) for a in alerts] == [
        ("check_failed", "too_few_documents", "WARN")] * len(shards)
    assert all(a["id"].startswith("check:") and a["metadata"] == {"documents": "3", "threshold": "10"} for a in alerts)
    assert len(receiver.posts) == len(shards)
    assert sorted((p.label, p.check, p.severity) for p in result.check_problems) == sorted(
        (f"raw_corpus[{s}]", "too_few_documents", "WARN") for s in shards)

    result, cursor = tick(alert_defs, instance, cursor)  # the daemon's sensor, ticking after the driver
    assert result.skip_message == "no new failures"
    assert len(read_jsonl(settings.alerts_jsonl)) == len(shards) and len(receiver.posts) == len(shards)

    # A run the driver did not alert (here a check-only run without sinks) is still the sensor's.
    run_checks(alert_defs, instance, [RAW], shards[0])
    _, cursor = tick(alert_defs, instance, cursor)
    assert len(read_jsonl(settings.alerts_jsonl)) == len(shards) + 1 and len(receiver.posts) == len(shards) + 1
