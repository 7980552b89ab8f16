"""An OpenAI-compatible HTTP server for one model directory of the artifact store.

`create_app` loads the model and returns a Starlette app; `serve` runs it with uvicorn. Routes:

    POST /v1/completions       {"prompt": str | [str], "max_tokens", "temperature", "seed", "stop", "n",
                                "logprobs", "stream", "stream_options"}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], ...}, rendered by `prompts.chat_renderer`
                               as the SFT stage trained on: the tokenizer's chat template when it has one,
                               else the project's format, where the answer also ends at the next turn
    POST /v1/feedback          {"id": completion id, "rating": 1 | -1, "correction": text}
    GET  /v1/models            the one model, whose id is its artifact sha256
    GET  /health               liveness of the generation worker (no auth: for probes)
    GET  /metrics              Prometheus text format (no auth: for scrapers)

Every response carries the model's artifact hash (`model` field, `x-model-sha256` header), so a
client can tell which artifact answered. Errors are OpenAI-shaped, `{"error": {"message", "type",
"param", "code"}}`, and the message says what to change. With a `log_dir`, each /v1 request
appends one record to the durable request log and each feedback one to the feedback log
(`records.py`); a request is answered (a stream's `[DONE]` sent) only once its record is on disk.

A canary: given a candidate model (`create_app(..., candidate=...)`, `llm-assets serve --candidate`),
the server answers `canary_fraction` of the requests with the candidate release and the rest with the
current one. The draw is a hash of the request's `x-request-id` header (a random id without one), so
a client that sends the same id lands on the same release; a request whose `model` names one of the
two models is answered by it. Each log record and each response (`model`, `x-model-sha256`,
`x-release-sha256`) names the release that answered, which `canary_report` compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM

from llm_assets.hf_models import load_model, load_tokenizer
from llm_assets.prompts import PromptError, chat_renderer, has_chat_template
from llm_assets.serving.engine import (
    Delta,
    Engine,
    EngineBusyError,
    EngineClosedError,
    Generation,
    GenerationRequest,
    StepStats,
    TokenLogprob,
)
from llm_assets.serving.records import DurableLog
from llm_assets.store import validate_hash
from llm_assets.tracing import RequestTracer

log = logging.getLogger(__name__)

# Where a chat model starts a turn of its own (a line opening with "### "): the answer ends there,
# as the evaluation's answers do.
TURN_START = "\n### "
MODEL_HEADER = "x-model-sha256"
RELEASE_HEADER = "x-release-sha256"
REQUEST_ID_HEADER = "x-request-id"  # the canary's routing key
COMPLETION_ID = r"^(cmpl|chatcmpl)-[0-9a-f]{32}$"


class ServeConfig(BaseModel):
    """Limits and switches of the server; every limit is answered with a 4xx that names it."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(None, description="required as 'Authorization: Bearer KEY' on /v1; None: open")
    max_request_bytes: int = Field(64 * 1024, gt=0, description="largest request body (413 above)")
    max_prompt_tokens: int = Field(1024, gt=0, description="longest prompt, in tokens (400 above)")
    max_tokens: int = Field(256, gt=0, description="cap on a request's max_tokens, and its default")
    max_batch_size: int = Field(8, gt=0, description="sequences decoded together (slots of the running batch)")
    max_queued: int = Field(256, gt=0, description="sequences waiting for a slot (503 above)")
    log_dir: Path | None = Field(None, description="directory of the durable request and feedback logs")
    log_max_bytes: int = Field(64 * 2**20, gt=0, description="a log file is closed (rotated) at this size")
    log_max_age_s: float = Field(3600, gt=0, description="... or this many seconds after it was opened")
    log_prompts: bool = Field(False, description="also log prompt and answer texts (they may hold personal data)")
    release: str | None = Field(None, description="the release served, named in every log record")
    scheme: str | None = Field(None, description="the quantization scheme of the model served (None: full "
                                                 "precision), named in every log record")
    candidate_release: str | None = Field(None, description="the candidate release served next to `release` "
                                                            "(with create_app's candidate model)")
    canary_fraction: float = Field(0.1, gt=0, lt=1, description="share of requests the candidate answers")


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request bodies (unknown fields are ignored, as OpenAI clients send many) ----------------------


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk, with empty choices, carries the usage of the whole request


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: pass 0 for greedy answers
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range, a 64-bit integer
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", code="invalid_stop", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's and this many likeliest ones


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=COMPLETION_ID, description="the `id` of a completion this server answered")
    rating: Literal[1, -1]
    correction: str | None = Field(None, min_length=1, description="the answer the user wanted instead")


# -- metrics ----------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus instruments, in a registry of its own (one per app)."""

    def __init__(self, served: Sequence[Served]):
        self.registry = registry = CollectorRegistry()
        self.latency = Histogram("llm_request_duration_seconds", "Request latency, auth to the last byte",
                                 ["endpoint"], registry=registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.first_token = Histogram("llm_time_to_first_token_seconds", "From queueing to the first token",
                                     registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.requests = Counter("llm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of answered requests", registry=registry)
        self.completion_tokens = Counter("llm_completion_tokens", "Tokens generated for answered requests",
                                         registry=registry)
        self.batch_size = Histogram("llm_batch_size", "Sequences decoded together per decoding step",
                                    registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens_per_second = Gauge("llm_tokens_per_second", "Generation throughput of the last decoding step",
                                       registry=registry)
        Gauge("llm_queued_requests", "Sequences waiting for a slot in the running batch", registry=registry
              ).set_function(lambda: sum(s.engine.queued for s in served))
        Gauge("llm_running_requests", "Sequences in the running batch", registry=registry
              ).set_function(lambda: sum(s.engine.running for s in served))
        info = Gauge("llm_model_info", "The models served, by artifact hash", ["sha256"], registry=registry)
        for arm in served:
            info.labels(arm.model_sha256).set(1)

    def observe_step(self, stats: StepStats) -> None:
        self.batch_size.observe(stats.rows)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.rows / stats.seconds)


# -- request handling, apart from the app's state ------------------------------------------------

RequestBody = TypeVar("RequestBody", bound=BaseModel)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read only up to `limit` bytes."""
    too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes; send a shorter "
                              "prompt", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before reading it
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object",
                       code="invalid_json")
    return data


def parse_body(cls: type[RequestBody], data: dict[str, Any], models: Sequence[str]) -> RequestBody:
    """The request body as `cls`, refusing what this server does not do."""
    try:
        body = cls.model_validate(data)
    except ValidationError as exc:
        problems = _field_problems(exc, cls)
        raise APIError(400, "; ".join(problems.values()), code="invalid_field",
                       param=next(iter(problems))) from None
    named = getattr(body, "model", None)
    if named is not None and not (len(named) >= 6 and any(m.startswith(named.lower()) for m in models)):
        raise APIError(404, f"model {named!r} is not served here; this server serves {' and '.join(models)} "
                            "(leave model out, or pass that hash or 6+ of its first characters)",
                       code="model_not_found", param="model")
    return body


def token_budget(prompts: list[list[int]], requested: int | None, param: str, config: ServeConfig, context: int
                 ) -> int:
    """max_tokens for these prompts, within the server's limits and the model's context."""
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise APIError(400, "the prompt is empty; send at least one character", code="empty_prompt", param=param)
    if longest > config.max_prompt_tokens:
        raise APIError(400, f"the prompt has {longest} tokens, over this server's limit of "
                            f"{config.max_prompt_tokens}; shorten it", code="context_length_exceeded",
                       param=param)
    if requested is not None and requested > config.max_tokens:
        raise APIError(400, f"max_tokens {requested} is over this server's cap of {config.max_tokens}; "
                            "lower it", code="max_tokens_exceeded", param="max_tokens")
    room = context - longest
    if room < 1:
        raise APIError(400, f"the prompt has {longest} tokens and leaves no room in the model's context of "
                            f"{context} tokens; shorten it", code="context_length_exceeded",
                       param=param)
    max_tokens = requested if requested is not None else min(config.max_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"{longest} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                            f"{context} tokens; shorten the prompt or lower max_tokens",
                       code="context_length_exceeded", param="max_tokens")
    return max_tokens


def usage(prompt_tokens: int, results: Sequence[Generation]) -> dict[str, int]:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions format; `offset`: where the first token's text starts in the answer."""
    starts = [offset]
    for token in tokens[:-1]:
        starts.append(starts[-1] + len(token.token))
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": starts[:len(tokens)]}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*rival) for rival in t.top]}
                        for t in tokens], "refusal": None}


@dataclass(frozen=True)
class CompletionShape:
    """How /v1/completions words its choices, whole and streamed."""

    logprobs: bool
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def choice(self, index: int, result: Generation) -> dict[str, Any]:
        return {"index": index, "text": result.text, "finish_reason": result.finish_reason,
                "logprobs": completion_logprobs(result.logprobs, 0) if self.logprobs else None}

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(self, index: int, delta: Delta, offset: int) -> dict[str, Any]:
        return {"index": index, "text": delta.text, "finish_reason": None,
                "logprobs": completion_logprobs(delta.logprobs, offset) if self.logprobs else None}

    def finish(self, index: int, result: Generation) -> dict[str, Any]:
        return {"index": index, "text": "", "finish_reason": result.finish_reason, "logprobs": None}


@dataclass(frozen=True)
class ChatShape:
    """How /v1/chat/completions words its choices, whole and streamed."""

    logprobs: bool
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, index: int, result: Generation) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": chat_logprobs(result.logprobs) if self.logprobs else None}

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                "logprobs": None}

    def delta(self, index: int, delta: Delta, offset: int) -> dict[str, Any]:
        return {"index": index, "delta": {"content": delta.text}, "finish_reason": None,
                "logprobs": chat_logprobs(delta.logprobs) if self.logprobs else None}

    def finish(self, index: int, result: Generation) -> dict[str, Any]:
        return {"index": index, "delta": {}, "finish_reason": result.finish_reason, "logprobs": None}


Shape = CompletionShape | ChatShape


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: a `data:` line (JSON, or the closing `[DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the releases served --------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One model the server answers with, and the release it is the model of."""

    role: Literal["current", "candidate"]
    model_sha256: str
    release: str | None
    scheme: str | None
    engine: Engine
    render_chat: Callable[[list[dict[str, str]]], str]
    turn_stops: list[str]  # where an answer ends besides the request's stops


def load_served(role: Literal["current", "candidate"], model_dir: Path, model_sha256: str, release: str | None,
                scheme: str | None, config: ServeConfig) -> Served:
    """Load a model directory for serving (a broken one fails here, before a port is bound)."""
    validate_hash(model_sha256)
    tokenizer = load_tokenizer(Path(model_dir))
    model = load_model(AutoModelForCausalLM, Path(model_dir), tokenizer)
    render_chat = chat_renderer(tokenizer)  # before the engine's thread uses the tokenizer
    # The project's format has no end-of-turn token: a turn ends where the next header starts.
    turn_stops = [] if has_chat_template(tokenizer) else [TURN_START]
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size, max_queued=config.max_queued)
    return Served(role, model_sha256, release, scheme, engine, render_chat, turn_stops)


def routes_to_candidate(key: str, fraction: float) -> bool:
    """Whether the request with routing key `key` goes to the candidate: the key's hash, read as a
    number uniform in [0, 1), is below `fraction`. The same key always lands on the same release."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


# -- the app --------------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable["tuple[dict[str, Any], dict[str, Any]] | StreamingResponse"]]


def create_app(model_dir: Path, model_sha256: str, config: ServeConfig,
               candidate: tuple[Path, str] | None = None) -> Starlette:
    """The server of the model in `model_dir`, reported as the artifact `model_sha256`; with a
    `candidate` (model directory, artifact hash) of `config.candidate_release`, a canary of it.

    The models are loaded here (a broken directory fails before a port is bound); the generation
    workers and the logs start and stop with the app's lifespan.
    """
    if (candidate is None) != (config.candidate_release is None):
        raise ValueError("a canary needs both the candidate's model (create_app's candidate) and its release "
                         "(ServeConfig.candidate_release); give both or neither")
    current = load_served("current", model_dir, model_sha256, config.release, config.scheme, config)
    served = [current] if candidate is None else [
        current, load_served("candidate", *candidate, config.candidate_release, None, config)]
    engine, served_models = current.engine, [arm.model_sha256 for arm in served]
    # Which release answered each recent completion, for the feedback on it (bounded: the oldest go).
    answered_by: OrderedDict[str, Served] = OrderedDict()
    tracer = RequestTracer()  # its spans are exported as they end, the last ones when the app stops
    metrics = Metrics(served)
    for arm in served:
        arm.engine.on_step = metrics.observe_step
    logs = [] if config.log_dir is None else [
        DurableLog(config.log_dir, name, max_bytes=config.log_max_bytes, max_age_s=config.log_max_age_s)
        for name in ("requests", "feedback")]
    request_log, feedback_log = logs or (None, None)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def route(request: Request) -> Served:
        """The release that answers this request (the canary's draw); kept on the request."""
        key = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        request.state.served = served[-1] if len(served) > 1 and routes_to_candidate(
            key, config.canary_fraction) else current
        return request.state.served

    def named(request: Request, body: BaseModel) -> Served:
        """The release that answers: the one whose model the body names (parse_body checked it is
        served), else the one the draw picked."""
        model_name = getattr(body, "model", None)
        if model_name is not None and not request.state.served.model_sha256.startswith(model_name.lower()):
            request.state.served = next(s for s in served if s.model_sha256.startswith(model_name.lower()))
        return request.state.served

    def headers_of(arm: Served) -> dict[str, str]:
        return {MODEL_HEADER: arm.model_sha256, **({RELEASE_HEADER: arm.release} if arm.release else {})}

    def record(request: Request, status: int, error: str | None, entry: dict[str, Any]):
        """Count the request in the metrics and append it to the request log; the returned future (None
        without a log) resolves once the record is on disk."""
        path, seconds = request.url.path, time.perf_counter() - request.state.started
        metrics.latency.labels(path).observe(seconds)
        metrics.requests.labels(path, str(status)).inc()
        metrics.prompt_tokens.inc(entry.get("prompt_tokens", 0))
        metrics.completion_tokens.inc(entry.get("completion_tokens", 0))
        if entry.get("first_token_s") is not None:
            metrics.first_token.observe(entry["first_token_s"])
        if request_log is None:
            return None
        arm = request.state.served
        return request_log.append({
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "id": None, "endpoint": path,
            "status": status, "error": error, "latency_s": round(seconds, 4), "prompt_tokens": 0,
            "completion_tokens": 0, "model": arm.model_sha256, "release": arm.release, "scheme": arm.scheme,
            **({"canary": arm.role} if len(served) > 1 else {}), **entry})

    def submit(arm: Served, requests: list[GenerationRequest], listener=None) -> list:
        try:
            return arm.engine.submit(requests, listener)
        except EngineBusyError as exc:  # nothing of the request was queued
            raise APIError(503, f"the server is overloaded ({exc}); retry in a second", code="overloaded",
                           type="server_error", headers={"Retry-After": "1"}) from None
        except EngineClosedError as exc:
            raise APIError(503, str(exc), code="shutting_down", type="server_error") from None

    async def answered(request: Request, futures: list) -> list[Generation]:
        """The answers, or a 499 when the client goes away first; then its sequences are cancelled,
        which frees their slots in the running batch."""
        answers = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answers.done():
                answers.cancel()  # cancels the engine's futures too
        if answers.cancelled():
            raise APIError(499, "the client closed the connection", code="client_disconnected")
        try:
            return answers.result()
        except EngineClosedError as exc:  # queued when the server began to stop
            raise APIError(503, str(exc), code="shutting_down", type="server_error") from None

    async def generate(request: Request, shape: Shape, body: _Sampling, prompts: list[str], requested: int | None,
                       stops: list[str], top_logprobs: int | None, param: str, texts: dict[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, Any]] | StreamingResponse:
        arm = named(request, body)
        encoded = [arm.engine.encode(p) for p in prompts]
        max_tokens = token_budget(encoded, requested, param, config, arm.engine.context_length)
        if len(prompts) * body.n > config.max_queued:
            raise APIError(400, f"{len(prompts)} prompts × n={body.n} is over this server's limit of "
                                f"{config.max_queued} sequences per request; send fewer", code="too_many_sequences",
                           param="n" if body.n > 1 else param)
        # Choice j of every prompt samples with seed + j: n choices differ, and each one is repeatable.
        requests = [GenerationRequest(ids, max_tokens, body.temperature, None if body.seed is None else body.seed + j,
                                      stops, top_logprobs) for ids in encoded for j in range(body.n)]
        prompt_tokens = sum(map(len, encoded))
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": arm.model_sha256}
        answered_by[head["id"]] = arm
        while len(answered_by) > 100_000:
            answered_by.popitem(last=False)

        def entry(results: Sequence[Generation]) -> dict[str, Any]:
            return {"id": head["id"], "stream": body.stream, "choices": len(results),
                    "finish_reasons": [r.finish_reason for r in results], **usage(prompt_tokens, results),
                    "first_token_s": round(min(r.first_token_s for r in results), 4),
                    **({**texts, "completion": [r.text for r in results]} if config.log_prompts else {})}

        if not body.stream:
            results = await answered(request, submit(arm, requests))
            return {**head, "object": shape.object, "choices": [shape.choice(i, r) for i, r in enumerate(results)],
                    "usage": usage(prompt_tokens, results)}, entry(results)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        futures = submit(arm, requests,
                         lambda index, event: loop.call_soon_threadsafe(events.put_nowait, (index, event)))
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(choices: list[dict[str, Any]]) -> str:
            return sse({**head, "object": shape.chunk_object, "choices": choices})

        async def chunks() -> AsyncIterator[str]:
            results: dict[int, Generation] = {}
            sent = [0] * len(futures)  # characters of each choice streamed so far
            outcome: tuple[int, str | None] = (499, "client_disconnected")  # unless the loop below finishes
            try:
                for index in range(len(futures)):
                    if (opening := shape.opening(index)) is not None:
                        yield chunk([opening])
                while len(results) < len(futures):
                    index, event = await events.get()
                    if isinstance(event, Delta):
                        yield chunk([shape.delta(index, event, sent[index])])
                        sent[index] += len(event.text)
                    elif isinstance(event, Generation):
                        results[index] = event
                        yield chunk([shape.finish(index, event)])
                    else:
                        raise event
                ordered = [results[i] for i in range(len(futures))]
                if include_usage:
                    yield sse({**head, "object": shape.chunk_object, "choices": [],
                               "usage": usage(prompt_tokens, ordered)})
                outcome = (200, None)
                written = record(request, 200, None, entry(ordered))
                if written is not None:
                    await asyncio.wrap_future(written)  # [DONE] acknowledges a record that is on disk
                yield sse("[DONE]")
            except Exception as exc:  # the stream has begun: the error goes in the stream
                error = (APIError(503, str(exc), code="shutting_down", type="server_error")
                         if isinstance(exc, EngineClosedError) else
                         APIError(500, f"the server failed to answer ({type(exc).__name__}); see its log",
                                  code="internal_error", type="server_error"))
                if not isinstance(exc, EngineClosedError):
                    log.exception("%s failed mid-stream", request.url.path)
                if outcome[0] != 200:
                    outcome = (error.status, error.code)
                yield sse(error.body())
            finally:
                for future in futures:
                    future.cancel()  # a client that went away frees its slots; a no-op for answered ones
                if outcome[0] != 200:
                    record(request, outcome[0], outcome[1], {"id": head["id"], "stream": True})

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={**headers_of(arm), "Cache-Control": "no-cache"})

    async def completions(request: Request) -> tuple[dict[str, Any], dict[str, Any]] | StreamingResponse:
        body = parse_body(CompletionRequest, await read_json(request, config.max_request_bytes), served_models)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings", code="empty_prompt",
                           param="prompt")
        return await generate(request, CompletionShape(body.logprobs is not None), body, prompts, body.max_tokens,
                              body.stops(), body.logprobs, "prompt", {"prompt": prompts})

    async def chat_completions(request: Request) -> tuple[dict[str, Any], dict[str, Any]] | StreamingResponse:
        body = parse_body(ChatRequest, await read_json(request, config.max_request_bytes), served_models)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true; set it, or leave top_logprobs out",
                           code="invalid_field", param="top_logprobs")
        messages = [m.model_dump() for m in body.messages]
        arm = named(request, body)
        try:
            prompt = arm.render_chat(messages)
        except PromptError as exc:
            raise APIError(400, str(exc), code="invalid_field", param="messages") from None
        return await generate(request, ChatShape(body.logprobs), body, [prompt],
                              body.max_completion_tokens or body.max_tokens, [*body.stops(), *arm.turn_stops],
                              (body.top_logprobs or 0) if body.logprobs else None, "messages", {"messages": messages})

    async def feedback(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        body = parse_body(FeedbackRequest, await read_json(request, config.max_request_bytes), served_models)
        if feedback_log is None:
            raise APIError(503, "this server keeps no feedback log: start it with a log directory "
                                "(llm-assets serve --log-dir DIR, or ServeConfig.log_dir)", code="feedback_disabled",
                           type="server_error")
        feedback_id = f"fb-{uuid.uuid4().hex}"
        # The release that answered the completion rated; one this server no longer remembers is
        # named only when there is a single release it can have been.
        rated = answered_by.get(body.id, current if len(served) == 1 else None)
        try:
            await asyncio.wrap_future(feedback_log.append({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "id": feedback_id,
                "completion_id": body.id, "rating": body.rating, "correction": body.correction,
                "model": rated and rated.model_sha256, "release": rated and rated.release}))
        except OSError as exc:
            raise APIError(500, f"the feedback was not recorded: {exc}", code="log_unavailable",
                           type="server_error") from None
        return {"id": feedback_id, "object": "feedback", "completion_id": body.id}, {"id": feedback_id}

    async def models(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"object": "list", "data": [{"id": arm.model_sha256, "object": "model", "created": created,
                                            "owned_by": "llm-assets"} for arm in served]}, {}

    def api(path: str, handler: Handler, methods: list[str]) -> Route:
        """The route, with auth, errors, metrics and the request log around `handler`."""

        async def endpoint(request: Request) -> Response:
            # A server span per request, exported when an OTLP endpoint is set (llm_assets/tracing.py);
            # a streamed answer's span ends when its first chunk is ready.
            with tracer.request_span(request.method, path, {"llm.model_sha256": route(request).model_sha256}) as span:
                response = await answer_of(request)
                span.set_attribute("http.response.status_code", response.status_code)
                return response

        async def answer_of(request: Request) -> Response:
            request.state.started = time.perf_counter()
            entry: dict[str, Any] = {}
            error = None
            try:
                authorize(request)
                answer = await handler(request)
                if isinstance(answer, StreamingResponse):
                    return answer  # it counts and logs itself when the stream ends
                payload, entry = answer
                response: Response = JSONResponse(payload)
            except APIError as exc:
                error, response = exc.code, exc.response()
            except Exception:
                log.exception("%s failed", path)
                error = "internal_error"
                response = APIError(500, "the server failed to answer; see its log", code=error,
                                    type="server_error").response()
            response.headers.update(headers_of(request.state.served))
            written = record(request, response.status_code, error, entry)
            if written is not None:
                try:
                    await asyncio.wrap_future(written)  # answer only what the log holds
                except OSError as exc:
                    log.error("%s: %s", path, exc)
                    if response.status_code < 400:
                        response = APIError(500, f"the answer was not recorded, so it is withheld: {exc}",
                                            code="log_unavailable", type="server_error").response()
                        response.headers.update(headers_of(request.state.served))
            return response

        return Route(path, endpoint, methods=methods)

    async def health(request: Request) -> Response:
        alive = all(arm.engine.alive for arm in served)
        return JSONResponse({"status": "ok" if alive else "generation worker stopped", "model": model_sha256,
                             **({"candidate": served[-1].model_sha256} if len(served) > 1 else {}),
                             "queued": sum(arm.engine.queued for arm in served),
                             "running": sum(arm.engine.running for arm in served)},
                            status_code=200 if alive else 503, headers={MODEL_HEADER: model_sha256})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for durable in logs:
            durable.open()
        for arm in served:
            arm.engine.start()
        try:
            yield
        finally:
            for arm in served:  # each finishes the sequences in flight, off the event loop
                await asyncio.to_thread(arm.engine.close)
            for durable in logs:
                await asyncio.to_thread(durable.close)
            await asyncio.to_thread(tracer.close)

    app = Starlette(routes=[
        api("/v1/completions", completions, ["POST"]),
        api("/v1/chat/completions", chat_completions, ["POST"]),
        api("/v1/feedback", feedback, ["POST"]),
        api("/v1/models", models, ["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.engine, app.state.served, app.state.metrics, app.state.logs = engine, served, metrics, logs
    return app


def serve(model_dir: Path, model_sha256: str, *, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None, candidate: tuple[Path, str] | None = None) -> None:
    """Serve the model until interrupted (Ctrl-C or SIGTERM finish the requests in flight)."""
    config = config or ServeConfig()
    if config.api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who reaches it can use the model; "
                    "pass an API key, or bind 127.0.0.1", host)
    app = create_app(model_dir, model_sha256, config, candidate)
    # The request log replaces uvicorn's access log: one record per request, with tokens and the model.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")


@contextlib.contextmanager
def running(app: Starlette, host: str = "127.0.0.1", timeout: float = 30) -> Iterator[str]:
    """Serve `app` from a background thread on a port the OS picks; yields the base URL and stops
    the server on exit. The socket is bound before the server starts: no race for a free port."""
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f}s; see the log above")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout:.0f}s")


def _field_problems(exc: ValidationError, cls: type[BaseModel]) -> dict[str, str]:
    """The first problem of each field, as 'path: what is wrong (got value)'."""
    known = {*cls.model_fields, *ChatMessage.model_fields}
    problems: dict[str, str] = {}
    for error in exc.errors():
        # Union members show up in the location ("prompt.str"): the field's path is what helps.
        where = ".".join(str(p) for p in error["loc"] if isinstance(p, int) or p in known
                         or error["type"] == "extra_forbidden") or "body"
        if error["type"] == "missing":
            problems.setdefault(where, f"{where}: missing; add it")
        else:
            problems.setdefault(where, f"{where}: {error['msg']} (got {error['input']!r:.80})")
    return problems


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
