"""Streaming, n, logprobs, stop and feedback, spoken to with the `openai` client; continuous batching,
disconnects and overload against a server whose model is slowed down to a big model's pace."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import torch
from openai import OpenAI

from llm_assets.serving import ServeConfig, create_app, running
from llm_assets_tests.serving.conftest import API_KEY, CONFIG, RunningServer
from llm_assets_tests.serving.test_server import hf_model  # noqa: F401

LONG = "Roll the ball"  # the tiny model's greedy answer to it runs to max_tokens (no EOS)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_a_streamed_completion_is_the_whole_answer_in_pieces(server: RunningServer, client: OpenAI) -> None:
    asked = dict(model=server.sha256, prompt=LONG, max_tokens=40, temperature=0)
    whole = client.completions.create(**asked)
    chunks = list(client.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: the last chunk
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {server.sha256}
    logged = next(r for r in server.records() if r["id"] == chunks[0].id)
    assert logged["stream"] and logged["status"] == 200 and logged["release"] == "r" * 64
    assert logged["completion_tokens"] == whole.usage.completion_tokens == 40 and logged["first_token_s"] > 0


def test_a_streamed_chat_answer_opens_with_the_role_and_ends_at_the_next_turn(server: RunningServer,
                                                                               client: OpenAI) -> None:
    asked = dict(model=server.sha256, messages=[{"role": "user", "content": "What does `shapes.solid.Cube.volume` "
                                                                         "do?"}], max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert "\n### " not in whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_server_sent_events_are_data_lines_closed_by_done(server: RunningServer) -> None:
    reply = Stream(server.url, {"prompt": "Return the", "max_tokens": 8, "temperature": 0, "stream": True}).response
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    assert reply.getheader("x-model-sha256") == server.sha256
    events = reply.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"  # every event ends with a blank line
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_a_stop_string_is_never_streamed(server: RunningServer, client: OpenAI) -> None:
    asked = dict(model=server.sha256, prompt="Return the", max_tokens=30, temperature=0, stop=[" cube"])
    whole = client.completions.create(**asked).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**asked, stream=True))
    assert whole.text == streamed == " volume of the" and whole.finish_reason == "stop"


def test_n_choices_are_distinct_and_repeatable_with_a_seed(server: RunningServer, client: OpenAI) -> None:
    asked = dict(model=server.sha256, prompt="def", max_tokens=16, temperature=1.0, seed=5)
    one = client.completions.create(**asked)
    first, again = client.completions.create(**asked, n=3), client.completions.create(**asked, n=3)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.text for c in again.choices] and texts[0] == one.choices[0].text
    assert first.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once, not per choice
    streamed = list(client.completions.create(**asked, n=2, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}
    assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == 1) == texts[1]


def test_logprobs_are_the_models(server: RunningServer, client: OpenAI, hf_model) -> None:  # noqa: F811
    model, tokenizer = hf_model
    choice = client.completions.create(model=server.sha256, prompt="Return the", max_tokens=6, temperature=0,
                                       logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset[0] == 0
    assert all(len(top) == 2 and lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the likeliest
               for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs))
    with torch.inference_mode():
        first = torch.log_softmax(model(**tokenizer("Return the", return_tensors="pt")).logits[0, -1], -1)
    assert logprobs.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)

    chat = client.chat.completions.create(model=server.sha256, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).choices[0]
    assert "".join(t.token for t in chat.logprobs.content) == chat.message.content
    assert all(len(t.top_logprobs) == 3 for t in chat.logprobs.content)
    refused = server.call("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert refused.status == 400 and refused.body["error"]["param"] == "top_logprobs"


def test_feedback_is_recorded_against_its_completion(server: RunningServer, client: OpenAI) -> None:
    answer = client.completions.create(model=server.sha256, prompt="Return the", max_tokens=4, temperature=0)
    reply = server.call("/v1/feedback", {"id": answer.id, "rating": -1, "correction": "the volume"})
    assert reply.status == 200 and reply.body["completion_id"] == answer.id, reply.body
    recorded = server.records("feedback")[-1]
    assert recorded == {**recorded, "id": reply.body["id"], "completion_id": answer.id, "rating": -1,
                        "correction": "the volume", "model": server.sha256, "release": "r" * 64}
    assert any(r["id"] == answer.id and r["status"] == 200 for r in server.records())


@pytest.mark.parametrize(("body", "key", "status", "param"), [
    ({"id": "cmpl-" + "0" * 32, "rating": 2}, API_KEY, 400, "rating"),
    ({"id": "chat-42", "rating": 1}, API_KEY, 400, "id"),
    ({"rating": 1}, API_KEY, 400, "id"),
    ({"id": "cmpl-" + "0" * 32, "rating": 1, "stars": 5}, API_KEY, 400, "stars"),
    ({"id": "cmpl-" + "0" * 32, "rating": 1}, None, 401, None),
])
def test_bad_feedback_is_refused_and_not_recorded(server: RunningServer, body, key, status, param) -> None:
    before = len(server.records("feedback"))
    reply = server.call("/v1/feedback", body, key=key)
    assert reply.status == status and reply.body["error"]["param"] == param, reply.body
    assert len(server.records("feedback")) == before


# -- continuous batching, disconnects and overload, at a big model's pace -----------------------------

STEP_S = 0.02  # the slowed model's time per forward pass


@pytest.fixture(scope="module")
def slow_server(model_artifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir, sha256 = model_artifact
    log_dir = tmp_path_factory.mktemp("slow-logs")
    app = create_app(model_dir, sha256, ServeConfig(**{**CONFIG, "max_tokens": 100, "max_batch_size": 2,
                                                       "max_queued": 2}, log_dir=log_dir))
    model = app.state.engine.model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    with running(app) as url:
        yield RunningServer(url, model_dir, sha256, log_dir, app)


class Stream:
    """A streaming completion, POSTed on a connection of its own, read as it arrives (or hung up on)."""

    def __init__(self, url: str, body: dict, key: str = API_KEY):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.connection.request("POST", "/v1/completions", json.dumps(body),
                                {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        self.response = self.connection.getresponse()

    def close(self) -> None:
        self.response.close()
        self.connection.close()  # with the response's, the last reference: the socket closes


def long_stream(server: RunningServer) -> Stream:
    """A 100-token answer (2 s at the slowed pace), its first token already received."""
    stream = Stream(server.url, {"prompt": LONG, "max_tokens": 100, "temperature": 0, "stream": True})
    assert stream.response.status == 200
    stream.response.readline()
    return stream


def wait_for(condition, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_short_request_is_not_held_back_by_a_long_one(slow_server: RunningServer) -> None:
    long = long_stream(slow_server)
    started = time.perf_counter()
    short = slow_server.call("/v1/completions", {"prompt": "Return the", "max_tokens": 4, "temperature": 0})
    waited = time.perf_counter() - started
    assert short.status == 200 and short.body["usage"]["completion_tokens"] == 4
    # It joined the running batch: a few steps, not the long answer's 100 first.
    assert waited < 25 * STEP_S, f"the short request took {waited:.2f}s"
    assert b"data: [DONE]" in long.response.read()
    long.close()


def test_a_client_that_goes_away_frees_its_slot(slow_server: RunningServer) -> None:
    engine = slow_server.app.state.engine
    streams = [long_stream(slow_server) for _ in range(2)]  # both slots of the running batch
    assert wait_for(lambda: engine.running == 2)
    for stream in streams:
        stream.close()
    assert wait_for(lambda: engine.running == 0), "the abandoned streams are still being decoded"
    started = time.perf_counter()
    assert slow_server.call("/v1/completions", {"prompt": "Return the", "max_tokens": 4}).status == 200
    assert time.perf_counter() - started < 25 * STEP_S
    gone = [r for r in slow_server.records() if r["status"] == 499]
    assert len(gone) == 2 and {r["error"] for r in gone} == {"client_disconnected"}


def test_an_overloaded_request_is_refused_whole_and_leaves_nothing_queued(slow_server: RunningServer) -> None:
    engine = slow_server.app.state.engine
    streams = [long_stream(slow_server) for _ in range(2)]  # the running batch is full
    waiting = Stream(slow_server.url, {"prompt": "Return the", "max_tokens": 4, "stream": True})
    assert wait_for(lambda: engine.queued == 1)
    reply = slow_server.call("/v1/completions", {"prompt": ["Return the", "def"], "max_tokens": 4})
    assert reply.status == 503 and reply.body["error"]["code"] == "overloaded"
    assert reply.headers["retry-after"] == "1"
    assert engine.queued == 1  # neither of its two prompts was queued
    for stream in [*streams, waiting]:
        stream.close()
    assert wait_for(lambda: engine.running == engine.queued == 0)


def test_concurrent_streaming_clients_get_no_errors(server: RunningServer, client: OpenAI) -> None:
    """A bounded load: 8 streaming clients for 2 s; every stream must end with its usage."""
    failures: list[str] = []
    streams = 0
    deadline = time.monotonic() + 2.0
    lock = threading.Lock()

    def one_client(i: int) -> None:
        nonlocal streams
        while time.monotonic() < deadline:
            try:
                chunks = list(client.completions.create(model=server.sha256, prompt=LONG, max_tokens=16,
                                                        temperature=0.8, seed=i, stream=True,
                                                        stream_options={"include_usage": True}))
                assert 0 < chunks[-1].usage.completion_tokens <= 16 and chunks[-2].choices[0].finish_reason
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(repr(exc))
            else:
                with lock:
                    streams += 1

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert streams >= 8
