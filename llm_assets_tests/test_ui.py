"""The Dagster UI on a materialized instance, driven by headless Chromium: the whole lifecycle
graph and every check are shown. Saves a screenshot; `LLM_ASSETS_UPDATE_SCREENSHOT=1` also
refreshes the one the README shows (docs/img/asset-graph.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import playwright.sync_api as playwright
import pytest
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.settings import PROJECT_ROOT, Settings, prepare_dagster_home
from llm_assets_tests.conftest import stop_process_group

README_SCREENSHOT = PROJECT_ROOT / "docs" / "img" / "asset-graph.png"
# Debian's chromium: `playwright install` would download browsers, and there is no network for it.
CHROMIUM = os.environ.get("LLM_ASSETS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def headless_chromium(pw: playwright.Playwright) -> playwright.Browser:
    """Debian's chromium, headless; a clear failure when the system packages are missing."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/install-system-packages.sh (or set LLM_ASSETS_CHROMIUM)")
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True)
# The README image: the whole graph legible at GitHub's width, drawn at twice the pixel density.
VIEWPORT = {"width": 1600, "height": 1000}
SERVER_START_TIMEOUT_S = 90.0
UI_TIMEOUT_MS = 20_000


def ui_manifest() -> dict:
    """The shipped manifest with every stage configured, its sources cut to the tests' stdlib slice."""
    manifest = yaml.safe_load((PROJECT_ROOT / "pipeline.yaml").read_text())
    for source in manifest["sources"]:
        source.update(include=["json/*", "email/*"], shard_mb=0.17)
    manifest["stages"]["splits"].update(train=0.6, val=0.2, test=0.2)
    return manifest


@dataclass(frozen=True)
class UI:
    url: str
    expected: dict[str, set[str]]  # asset key -> its check names, from the Definitions
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.load(response)
    assert "errors" not in body, f"GraphQL errors: {body['errors']}"
    return body["data"]


LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _wait_for_webserver(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until the server answers and our code location has loaded (or failed to: then say why)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}; log:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"dagster-webserver not ready after {SERVER_START_TIMEOUT_S:.0f} s; log:\n"
                        f"{log.read_text()[-4000:]}")
        try:
            entries = _graphql(url, LOCATIONS)["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
            entries = []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e["locationOrLoadError"] for e in entries
                      if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
            assert not errors, f"the code location failed to load: {errors}"
            return
        time.sleep(0.5)


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[UI]:
    """dagster-webserver on 127.0.0.1 over an instance where the first chain is materialized."""
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(ui_manifest(), sort_keys=False))
    settings = Settings(manifest=str(manifest), store_uri=str(tmp_path / "artifacts"),
                        alerts_jsonl=str(tmp_path / "alerts.jsonl"), alert_webhook_url=None, s3_endpoint_url=None)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    expected: dict[str, set[str]] = {k.to_user_string(): set() for k in graph.get_all_asset_keys()}
    for check in graph.asset_check_keys:
        expected[check.asset_key.to_user_string()].add(check.name)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_ASSETS_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), LLM_ASSETS_MANIFEST=settings.manifest, LLM_ASSETS_STORE=settings.store_uri,
               LLM_ASSETS_ALERTS_JSONL=settings.alerts_jsonl, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    with open(log, "wb") as log_file:
        # Its own session (process group): the webserver and the code server it spawns go together.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
             "-m", "llm_assets.definitions", "-d", str(PROJECT_ROOT)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )
    try:
        # Materialize while the server loads the code (~15 s): the two overlap on two cores.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = materialize_graph(defs, instance, selection="key:raw_corpus or key:corpus_inventory",
                                       log=lambda _: None)
        assert result.success, f"materializing the first chain failed: runs {result.failed_runs}"
        _wait_for_webserver(proc, url, log)
        # The first-visit modal would cover the graph.
        assert _graphql(url, "mutation { setNuxSeen }")["setNuxSeen"] is True
        yield UI(url=url, expected=expected, log=log)
    finally:
        stop_process_group(proc)


def _shown_as(label: str, key: str) -> bool:
    """A zoomed-out node truncates its name in the middle (`pretra…_checkpoint`)."""
    if label == key:
        return True
    head, sep, tail = label.partition("…")
    return bool(sep) and len(head) + len(tail) < len(key) and key.startswith(head) and key.endswith(tail)


def test_ui_shows_every_asset_and_check_of_the_lifecycle(ui: UI, tmp_path: Path) -> None:
    expected = ui.expected
    assert len(expected) >= 19 and {"raw_corpus", "eval_report", "release", "scaling_law"} <= set(expected)

    # The server serves the graph these Definitions make: same assets, same checks.
    served = _graphql(ui.url, """{ assetNodes { assetKey { path }
        assetChecksOrError { ... on AssetChecks { checks { name } } } } }""")["assetNodes"]
    assert {"/".join(n["assetKey"]["path"]): {c["name"] for c in n["assetChecksOrError"]["checks"]}
            for n in served} == expected

    with playwright.sync_playwright() as pw:
        browser = headless_chromium(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=2)
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{ui.url}/asset-groups")  # Lineage: the global asset graph

            # The graph starts with its groups collapsed: expand them all (the settings menu's ⌥E),
            # after hiding the navigation and the asset tree so the graph gets the whole width.
            page.get_by_text("Hide navigation").click()
            page.locator("button:has([aria-label=panel_show_right])").last.click()  # the asset tree's toggle
            page.keyboard.press("Alt+e")
            # Each asset is drawn as a node inside the graph's SVG.
            nodes = page.locator('svg foreignObject [class*="AssetNode_assetName"]')
            deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
            while nodes.count() < len(expected) and time.monotonic() < deadline:
                time.sleep(0.2)
            labels = nodes.all_inner_texts()
            missing = [k for k in expected if not any(_shown_as(label, k) for label in labels)]
            assert not missing and len(labels) == len(expected), (
                f"the asset graph shows {sorted(labels)}; missing {missing} (log: {ui.log})")
            # Rendered with the instance's state: the materialized chain is drawn green.
            for key in ("raw_corpus", "corpus_inventory"):
                box = page.locator('svg foreignObject [class*="minimalAssetNodeBox"]', has_text=key)
                playwright.expect(box).to_have_attribute("style", re.compile(re.escape("--color-background-green")))
            page.wait_for_timeout(500)  # let the zoom-to-fit transition settle before the picture
            shot = tmp_path / "asset-graph.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LLM_ASSETS_UPDATE_SCREENSHOT") == "1":
                README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, README_SCREENSHOT)

            # Selecting an asset opens its panel, which lists its checks (links to each check).
            # A client-side route change, as a click on a node does: a full reload per asset
            # would cost ~2 s each, and a stale panel cannot match (the links name the asset).
            for key, checks in sorted(expected.items()):
                page.evaluate("path => { history.pushState({}, '', path);"
                              " dispatchEvent(new PopStateEvent('popstate')); }", f"/asset-groups/{key}")
                links = page.locator(f'a[href^="/assets/{key}?view=checks&checkDetail="]')
                playwright.expect(links).to_have_count(len(checks))
                shown = {link.get_attribute("href").partition("checkDetail=")[2] for link in links.all()}
                assert shown == checks, f"{key}: the UI lists checks {sorted(shown)}, expected {sorted(checks)}"
        finally:
            browser.close()

