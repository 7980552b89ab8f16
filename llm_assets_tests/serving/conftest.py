"""Fixtures: the evaluation tests' tiny trained model, stored as an artifact, and a real server for it
on 127.0.0.1 (uvicorn in a background thread, stopped at teardown)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from llm_assets.serving import ServeConfig, create_app, running
from llm_assets.store import open_store

# The same tiny model the evaluation tests build (trained on docstrings and their chats in about a
# second): imported fixtures, not copies of them.
from llm_assets_tests.evaluation.conftest import heldout, tokenizer_dir, trained_dir  # noqa: F401

API_KEY = "test-key"
CONFIG = dict(api_key=API_KEY, max_request_bytes=4096, max_prompt_tokens=96, max_tokens=48, max_batch_size=8)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class RunningServer:
    url: str
    model_dir: Path
    sha256: str
    log_dir: Path
    app: Starlette

    def call(self, path: str, body: Any = None, *, key: str | None = API_KEY, raw: bytes | None = None,
             timeout: float = 60) -> Reply:
        """GET (no body) or POST a JSON body (or raw bytes); HTTP errors are replies too."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, json.loads(response.read()), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Reply(error.code, json.loads(error.read()), dict(error.headers))

    def records(self, kind: str = "requests") -> list[dict[str, Any]]:
        """Every record of the request (or feedback) log so far, closed files and the open one."""
        files = sorted(self.log_dir.glob(f"{kind}-*.jsonl*"))
        return [json.loads(line) for path in files for line in path.read_text().splitlines()]

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read().decode()


@pytest.fixture(scope="session")
def model_artifact(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # noqa: F811
    """The model as the pipeline hands it to a server: a directory of the store, and its hash."""
    store = open_store(str(tmp_path_factory.mktemp("store")))
    sha256 = store.put_dir(trained_dir).sha256
    return store.local_dir(sha256, verify=True), sha256


@pytest.fixture(scope="session")
def server(model_artifact: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir, sha256 = model_artifact
    log_dir = tmp_path_factory.mktemp("serve-logs")
    app = create_app(model_dir, sha256, ServeConfig(**CONFIG, log_dir=log_dir, release="r" * 64))
    with running(app) as url:
        yield RunningServer(url, model_dir, sha256, log_dir, app)


def server_url(process: subprocess.Popen, output: Path, timeout_s: float = 120) -> str:
    """The URL a server started in `process` listens on, read from its output (`output`): uvicorn
    names the port the OS picked. Fails with the output's tail if it never starts."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if found := re.search(r"Uvicorn running on (http://\S+)", output.read_text()):
            return found.group(1)
    raise AssertionError(f"the server did not start: {output.read_text()[-3000:]}")
