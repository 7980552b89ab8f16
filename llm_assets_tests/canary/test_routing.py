"""The server's canary: a real server on 127.0.0.1 answering with two releases, each request routed
by the hash of its x-request-id, every log record and response naming the release that answered."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_assets.serving import ServeConfig, create_app, running
from llm_assets.serving.server import RELEASE_HEADER, routes_to_candidate
from llm_assets.store import open_store
from llm_assets_tests.evaluation.conftest import heldout, tokenizer_dir, trained_dir  # noqa: F401
from llm_assets_tests.serving.conftest import API_KEY, CONFIG, model_artifact  # noqa: F401

CURRENT, CANDIDATE = "c" * 64, "d" * 64


def post(url: str, path: str, body: dict[str, Any], request_id: str | None = None) -> tuple[dict, dict]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
               **({"x-request-id": request_id} if request_id else {})}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read()), dict(response.headers)


@pytest.fixture(scope="module")
def canary(model_artifact, tmp_path_factory) -> Iterator[tuple[str, Path, str, str]]:  # noqa: F811
    """The evaluation tests' tiny model as the current release, and the same weights as a different
    artifact (one more file) as the candidate, served with 30 % of the traffic to the candidate."""
    model_dir, sha = model_artifact
    tmp = tmp_path_factory.mktemp("canary")
    shutil.copytree(model_dir, tmp / "candidate")
    (tmp / "candidate" / "NOTES.md").write_text("the candidate\n")
    store = open_store(str(tmp / "store"))
    candidate_sha = store.put_dir(tmp / "candidate").sha256
    config = ServeConfig(**CONFIG, log_dir=tmp / "logs", log_prompts=True, release=CURRENT,
                         candidate_release=CANDIDATE, canary_fraction=0.3)
    app = create_app(model_dir, sha, config, candidate=(store.local_dir(candidate_sha, verify=True), candidate_sha))
    with running(app) as url:
        yield url, tmp / "logs", sha, candidate_sha


def records(log_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(log_dir.glob(f"{kind}-*.jsonl*")) for line in
            path.read_text().splitlines()]


def test_each_request_is_answered_by_the_release_its_id_draws_and_the_log_names_it(canary):
    url, log_dir, sha, candidate_sha = canary
    keys = [f"session-{n}" for n in range(40)]
    answered = {}
    for key in keys:
        body, headers = post(url, "/v1/completions", {"prompt": "def parse(", "max_tokens": 3, "temperature": 0},
                             request_id=key)
        expected = routes_to_candidate(key, 0.3)
        assert headers[RELEASE_HEADER] == (CANDIDATE if expected else CURRENT)
        assert body["model"] == headers["x-model-sha256"] == (candidate_sha if expected else sha)
        answered[body["id"]] = expected
    assert 4 <= sum(answered.values()) <= 24  # both releases answer, about 30 % the candidate
    logged = {r["id"]: r for r in records(log_dir, "requests") if r["id"] in answered}
    assert len(logged) == len(answered)
    for completion_id, to_candidate in answered.items():
        record = logged[completion_id]
        assert record["release"] == (CANDIDATE if to_candidate else CURRENT)
        assert record["canary"] == ("candidate" if to_candidate else "current")
        assert record["model"] == (candidate_sha if to_candidate else sha)
    # The same id lands on the same release again.
    again = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}, request_id=keys[0])[1][RELEASE_HEADER]
    assert again == (CANDIDATE if routes_to_candidate(keys[0], 0.3) else CURRENT)


def test_feedback_names_the_release_that_answered_and_a_named_model_picks_its_release(canary):
    url, log_dir, sha, candidate_sha = canary
    body, headers = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3, "model": candidate_sha[:12]},
                         request_id=next(f"k{n}" for n in range(100) if not routes_to_candidate(f"k{n}", 0.3)))
    assert headers[RELEASE_HEADER] == CANDIDATE and body["model"] == candidate_sha  # named, not drawn
    post(url, "/v1/feedback", {"id": body["id"], "rating": -1})
    [rated] = [r for r in records(log_dir, "feedback") if r["completion_id"] == body["id"]]
    assert rated["release"] == CANDIDATE and rated["model"] == candidate_sha
    served = {m["id"] for m in json.loads(urllib.request.urlopen(urllib.request.Request(
        url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}), timeout=30).read())["data"]}
    assert served == {sha, candidate_sha}


def test_a_canary_needs_the_candidates_release_and_the_draw_is_a_fraction(model_artifact):  # noqa: F811
    model_dir, sha = model_artifact
    with pytest.raises(ValueError, match="a canary needs both the candidate's model"):
        create_app(model_dir, sha, ServeConfig(**CONFIG), candidate=(model_dir, sha))
    share = sum(routes_to_candidate(f"request-{n}", 0.1) for n in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
