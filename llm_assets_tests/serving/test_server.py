"""The OpenAI-compatible server, started for real on 127.0.0.1 and spoken to over HTTP."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.prompts import render_prompt
from llm_assets.serving import ServeConfig
from llm_assets.serving.engine import Engine, EngineBusyError, EngineClosedError, GenerationRequest
from llm_assets_tests.serving.conftest import CONFIG, RunningServer

PROMPTS = ["Return the", "class Cube:\n", "Roll the ball"]
QUESTION = [{"role": "user", "content": "What does `shapes.solid.Cube.volume` do?"}]


@pytest.fixture(scope="module")
def hf_model(server: RunningServer):
    """The served model's directory loaded by transformers, apart from the server."""
    model = AutoModelForCausalLM.from_pretrained(server.model_dir).eval()
    return model, AutoTokenizer.from_pretrained(server.model_dir)


@pytest.fixture(scope="module")
def greedy(hf_model):
    """What `model.generate` answers greedily for a prompt: the reference the server must match."""
    model, tokenizer = hf_model

    def answer(prompt: str, max_new_tokens: int) -> tuple[str, int]:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True), \
            encoded["input_ids"].shape[1]

    return answer


def metric_samples(server: RunningServer) -> dict[str, list]:
    """Every sample of /metrics, by sample name (e.g. llm_batch_size_bucket)."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(server.text("/metrics")):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_completions_are_the_models_greedy_answers(server: RunningServer, greedy) -> None:
    reply = server.call("/v1/completions", {"prompt": PROMPTS, "max_tokens": 20, "temperature": 0})
    assert reply.status == 200, reply.body
    assert reply.body["object"] == "text_completion"
    assert reply.body["model"] == server.sha256 and reply.headers["x-model-sha256"] == server.sha256
    references = [greedy(p, 20) for p in PROMPTS]
    assert [c["text"] for c in reply.body["choices"]] == [text for text, _ in references]
    assert reply.body["usage"]["prompt_tokens"] == sum(n for _, n in references)
    assert 0 < reply.body["usage"]["completion_tokens"] <= 20 * len(PROMPTS)
    models = server.call("/v1/models")
    assert [m["id"] for m in models.body["data"]] == [server.sha256]


def test_chat_answers_in_the_sft_prompt_format(server: RunningServer, greedy) -> None:
    reply = server.call("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 40, "temperature": 0,
                                                 "model": server.sha256[:12]})
    assert reply.status == 200, reply.body
    choice = reply.body["choices"][0]
    reference, prompt_tokens = greedy(render_prompt(QUESTION), 40)
    # The answer ends where the model would start a turn of its own.
    assert choice["message"] == {"role": "assistant", "content": reference.split("\n### ")[0]}
    assert choice["message"]["content"].strip()
    assert reply.body["usage"]["prompt_tokens"] == prompt_tokens
    assert reply.body["model"] == server.sha256


def test_a_seed_makes_sampling_repeatable(server: RunningServer) -> None:
    body = {"prompt": "Return the", "max_tokens": 24, "temperature": 1.0, "seed": 11}
    first, second = server.call("/v1/completions", body), server.call("/v1/completions", body)
    assert first.status == second.status == 200
    assert first.body["choices"][0]["text"] == second.body["choices"][0]["text"]


def test_api_key_is_required(server: RunningServer) -> None:
    for key in (None, "wrong-key"):
        reply = server.call("/v1/completions", {"prompt": "Return the"}, key=key)
        assert reply.status == 401
        assert reply.body["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in reply.body["error"]["message"]
        assert reply.headers["www-authenticate"] == "Bearer"
    assert server.call("/v1/models", key=None).status == 401
    health = server.call("/health", key=None)  # probes and scrapers need no key
    assert health.status == 200 and health.body["model"] == server.sha256


@pytest.mark.parametrize(("body", "raw", "status", "param", "says"), [
    ({"prompt": "x" * 5000}, None, 413, None, "limit of 4096 bytes"),
    (None, b"{not json", 400, None, "not valid JSON"),
    ({"promt": "Return the"}, None, 400, "prompt", "prompt: missing; add it"),
    ({"prompt": 5}, None, 400, "prompt", "prompt: Input should be a valid string"),
    ({"prompt": "Return the", "max_tokens": 49}, None, 400, "max_tokens", "over this server's cap of 48"),
    ({"prompt": "Return the " * 60}, None, 400, "prompt", "over this server's limit of 96; shorten it"),
    ({"prompt": "Return the", "seed": 2**70}, None, 400, "seed", "seed: Input should be less than or equal to"),
    ({"prompt": ["Return the"] * 100, "n": 3}, None, 400, "n", "over this server's limit of 256 sequences"),
    ({"prompt": "Return the", "model": "gpt-4"}, None, 404, "model", "not served here"),
])
def test_limits_and_bad_requests_are_4xx_that_say_what_to_change(server: RunningServer, body, raw, status, param,
                                                                 says) -> None:
    reply = server.call("/v1/completions", body, raw=raw)
    assert reply.status == status
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and says in error["message"], error


def test_bad_chat_messages_are_named(server: RunningServer) -> None:
    reply = server.call("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]})
    assert reply.status == 400
    assert reply.body["error"]["param"] == "messages.0.role"
    assert "'system', 'user' or 'assistant'" in reply.body["error"]["message"]


def test_concurrent_requests_share_decoding_steps(server: RunningServer) -> None:
    def shared_steps() -> float:
        """Decoding steps that advanced more than one sequence."""
        samples = metric_samples(server)
        alone = next(s.value for s in samples["llm_batch_size_bucket"] if s.labels["le"] == "1.0")
        return samples["llm_batch_size_count"][0].value - alone

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    sequential = [server.call("/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0})
                  .body["choices"][0]["text"] for p in prompts]
    before = shared_steps()
    start = threading.Barrier(len(prompts))

    def client(prompt: str) -> str:
        start.wait()
        reply = server.call("/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert reply.status == 200, reply.body
        return reply.body["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(client, prompts))
    assert shared_steps() > before
    assert concurrent == sequential  # joining a running batch (left padding) does not change a greedy answer


def test_metrics_and_request_log(server: RunningServer) -> None:
    logged = len(server.records())
    assert server.call("/v1/completions", {"prompt": "Return the", "max_tokens": 8, "temperature": 0}).status == 200
    assert server.call("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 8}).status == 200
    assert server.call("/v1/completions", {"prompt": "Return the"}, key=None).status == 401

    samples = metric_samples(server)
    endpoints = {s.labels["endpoint"] for s in samples["llm_request_duration_seconds_bucket"]}
    assert {"/v1/completions", "/v1/chat/completions"} <= endpoints
    statuses = {(s.labels["endpoint"], s.labels["status"]) for s in samples["llm_requests_total"] if s.value > 0}
    assert {("/v1/completions", "200"), ("/v1/completions", "401"), ("/v1/chat/completions", "200")} <= statuses
    assert samples["llm_completion_tokens_total"][0].value > 0
    assert samples["llm_tokens_per_second"][0].value > 0
    assert [s.labels["sha256"] for s in samples["llm_model_info"]] == [server.sha256]

    new = server.records()[logged:]
    assert [(r["endpoint"], r["status"]) for r in new] == [
        ("/v1/completions", 200), ("/v1/chat/completions", 200), ("/v1/completions", 401)]
    assert all(r["model"] == server.sha256 and r["latency_s"] > 0 for r in new)
    assert new[0]["completion_tokens"] > 0 and new[2]["error"] == "invalid_api_key"
    assert not any("prompt" in r or "completion" in r for r in new)  # no texts unless log_prompts


def test_load_holds_without_errors(server: RunningServer) -> None:
    """A bounded load test: 8 clients for 3 s on the loopback; every request must succeed."""
    clients, seconds = 8, 3.0
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            started = time.perf_counter()
            reply = server.call("/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 16,
                                                    "temperature": 0.8, "seed": i})
            with lock:
                if reply.status != 200:
                    failures.append(f"{reply.status}: {reply.body}")
                else:
                    latencies.append(time.perf_counter() - started)
                    tokens += reply.body["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    assert not failures, failures[:3]
    assert len(latencies) >= clients
    cuts = statistics.quantiles(latencies, n=100)
    print(f"\nload: {clients} clients, {wall:.1f}s, {len(latencies)} requests, 0 errors; latency p50 "
          f"{cuts[49] * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms; {len(latencies) / wall:.1f} req/s, "
          f"{tokens / wall:.0f} tokens/s")
    assert server.call("/health").body["queued"] == 0


def test_config_rejects_unknown_settings() -> None:
    with pytest.raises(ValidationError, match="max_token"):
        ServeConfig(**{**CONFIG, "max_token": 5})


def test_engine_refuses_what_does_not_fit_whole_and_fails_queued_requests_on_close(hf_model) -> None:
    engine = Engine(*hf_model, max_queued=2)  # never started: nothing is served
    prompt = GenerationRequest(engine.encode("Return the"), max_tokens=4)
    [queued] = engine.submit([prompt])
    with pytest.raises(EngineBusyError, match="1 requests are queued and this one brings 2"):
        engine.submit([prompt, prompt])
    assert engine.queued == 1  # the refused request left nothing behind
    engine.close()
    with pytest.raises(EngineClosedError, match="shutting down"):
        queued.result(timeout=5)
    with pytest.raises(EngineClosedError):
        engine.submit([prompt])
