"""An OpenAI-compatible HTTP server for one model directory of the artifact store.

`create_app` loads the model and returns a Starlette app; `serve` runs it with uvicorn. Routes:

    POST /v1/completions       {"prompt": str | [str], "max_tokens", "temperature", "seed", "stop"}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], ...}, rendered by `render_prompt`,
                               the format the SFT stage trained on; the answer ends at the next turn
    GET  /v1/models            the one model, whose id is its artifact sha256
    GET  /health               liveness of the generation worker (no auth: for probes)
    GET  /metrics              Prometheus text format (no auth: for scrapers)

Every response carries the model's artifact hash (`model` field, `x-model-sha256` header), so a
client can tell which artifact answered. Errors are OpenAI-shaped, `{"error": {"message", "type",
"param", "code"}}`, and the message says what to change. Each /v1 request appends one JSON line
to the request log (without prompt or answer text unless `log_prompts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import AutoModelForCausalLM

from llm_assets.hf_models import load_model, load_tokenizer
from llm_assets.prompts import render_prompt
from llm_assets.serving.engine import (
    BatchStats,
    Engine,
    EngineBusyError,
    EngineClosedError,
    Generation,
    GenerationRequest,
)
from llm_assets.store import validate_hash

log = logging.getLogger(__name__)

# Where a chat model starts a turn of its own (a line opening with "### "): the answer ends there,
# as the evaluation's answers do.
TURN_START = "\n### "
MODEL_HEADER = "x-model-sha256"


class ServeConfig(BaseModel):
    """Limits and switches of the server; every limit is answered with a 4xx that names it."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(None, description="required as 'Authorization: Bearer KEY' on /v1; None: open")
    max_request_bytes: int = Field(64 * 1024, gt=0, description="largest request body (413 above)")
    max_prompt_tokens: int = Field(1024, gt=0, description="longest prompt, in tokens (400 above)")
    max_tokens: int = Field(256, gt=0, description="cap on a request's max_tokens, and its default")
    max_batch_size: int = Field(8, gt=0, description="requests decoded together")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests to join")
    max_queued: int = Field(256, gt=0, description="requests waiting for a batch (503 above)")
    request_log: Path | None = Field(None, description="JSONL file, one line per /v1 request")
    log_prompts: bool = Field(False, description="also log prompt and answer texts (they may hold personal data)")


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request bodies (unknown fields are ignored, as OpenAI clients send many) ----------------------


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: pass 0 for greedy answers
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", code="invalid_stop", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# -- metrics and the request log ---------------------------------------------------------------------


class Metrics:
    """The server's Prometheus instruments, in a registry of its own (one per app)."""

    def __init__(self, model_sha256: str, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.latency = Histogram("llm_request_duration_seconds", "Request latency, auth to response",
                                 ["endpoint"], registry=registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.requests = Counter("llm_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of answered requests", registry=registry)
        self.completion_tokens = Counter("llm_completion_tokens", "Tokens generated for answered requests",
                                         registry=registry)
        self.batch_size = Histogram("llm_batch_size", "Requests decoded together per batch", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens_per_second = Gauge("llm_tokens_per_second", "Generation throughput of the last batch",
                                       registry=registry)
        Gauge("llm_queued_requests", "Requests waiting for a batch", registry=registry).set_function(
            lambda: engine.queued)
        Gauge("llm_model_info", "The model served, by artifact hash", ["sha256"], registry=registry).labels(
            model_sha256).set(1)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.tokens / stats.seconds)


class RequestLog:
    """One JSON line per request, flushed at once so a tailing monitor sees it."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- request handling, apart from the app's state ------------------------------------------------

RequestBody = TypeVar("RequestBody", bound=_Sampling)


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


def parse_body(cls: type[RequestBody], data: dict[str, Any], model_sha256: str) -> RequestBody:
    """The request body as `cls`, refusing what this server does not do."""
    try:
        body = cls.model_validate(data)
    except ValidationError as exc:
        problems = _field_problems(exc, cls)
        raise APIError(400, "; ".join(problems.values()), code="invalid_field",
                       param=next(iter(problems))) from None
    if body.stream:
        raise APIError(400, "streaming is not supported by this server; set stream to false",
                       code="unsupported", param="stream")
    if body.n != 1:
        raise APIError(400, f"n={body.n}: this server returns one choice per prompt; set n to 1",
                       code="unsupported", param="n")
    if body.model is not None and not (len(body.model) >= 6 and model_sha256.startswith(body.model.lower())):
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {model_sha256} "
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


def usage(results: list[Generation]) -> dict[str, int]:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- the app --------------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]


def create_app(model_dir: Path, model_sha256: str, config: ServeConfig) -> Starlette:
    """The server of the model in `model_dir`, reported as the artifact `model_sha256`.

    The model is loaded here (a broken directory fails before a port is bound); the generation
    worker and the request log start and stop with the app's lifespan.
    """
    validate_hash(model_sha256)
    tokenizer = load_tokenizer(Path(model_dir))
    model = load_model(AutoModelForCausalLM, Path(model_dir), tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                    max_queued=config.max_queued)
    metrics = Metrics(model_sha256, engine)
    engine.on_batch = metrics.observe_batch
    request_log = RequestLog(config.request_log)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def generate(prompts: list[str], body: _Sampling, requested: int | None, stops: list[str], param: str
                       ) -> list[Generation]:
        encoded = [engine.encode(p) for p in prompts]
        max_tokens = token_budget(encoded, requested, param, config, engine.context_length)
        try:
            futures = [engine.submit(GenerationRequest(ids, max_tokens, body.temperature, body.seed, stops))
                       for ids in encoded]
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except EngineBusyError as exc:
            raise APIError(503, f"the server is overloaded ({exc}); retry in a second", code="overloaded",
                           type="server_error", headers={"Retry-After": "1"}) from None
        except EngineClosedError as exc:  # at submit, or queued when the server began to stop
            raise APIError(503, str(exc), code="shutting_down", type="server_error") from None

    async def completions(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        body = parse_body(CompletionRequest, await read_json(request, config.max_request_bytes), model_sha256)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings", code="empty_prompt",
                           param="prompt")
        results = await generate(prompts, body, body.max_tokens, body.stops(), "prompt")
        payload = {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_sha256,
            "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                        for i, r in enumerate(results)],
            "usage": usage(results),
        }
        return payload, {"prompt": prompts, "completion": [r.text for r in results]}

    async def chat_completions(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        body = parse_body(ChatRequest, await read_json(request, config.max_request_bytes), model_sha256)
        messages = [m.model_dump() for m in body.messages]
        [result] = await generate([render_prompt(messages)], body, body.max_completion_tokens or body.max_tokens,
                                  [*body.stops(), TURN_START], "messages")
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_sha256,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage([result]),
        }
        return payload, {"messages": messages, "completion": [result.text]}

    async def models(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        model = {"id": model_sha256, "object": "model", "created": created, "owned_by": "llm-assets"}
        return {"object": "list", "data": [model]}, {}

    def api(path: str, handler: Handler, methods: list[str]) -> Route:
        """The route, with auth, errors, metrics and the request log around `handler`."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            payload: dict[str, Any] = {}
            texts: dict[str, Any] = {}
            error = None
            try:
                authorize(request)
                payload, texts = await handler(request)
                response: Response = JSONResponse(payload)
            except APIError as exc:
                error, response = exc.code, exc.response()
            except Exception:
                log.exception("%s failed", path)
                error = "internal_error"
                response = APIError(500, "the server failed to answer; see its log", code=error,
                                    type="server_error").response()
            response.headers[MODEL_HEADER] = model_sha256
            seconds = time.perf_counter() - started
            tokens = payload.get("usage", {})
            metrics.latency.labels(path).observe(seconds)
            metrics.requests.labels(path, str(response.status_code)).inc()
            metrics.prompt_tokens.inc(tokens.get("prompt_tokens", 0))
            metrics.completion_tokens.inc(tokens.get("completion_tokens", 0))
            request_log.write({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "id": payload.get("id"),
                "endpoint": path, "status": response.status_code, "error": error, "latency_s": round(seconds, 4),
                "prompt_tokens": tokens.get("prompt_tokens", 0),
                "completion_tokens": tokens.get("completion_tokens", 0), "model": model_sha256,
                **(texts if config.log_prompts else {}),
            })
            return response

        return Route(path, endpoint, methods=methods)

    async def health(request: Request) -> Response:
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "generation worker stopped", "model": model_sha256,
                             "queued": engine.queued}, status_code=200 if alive else 503,
                            headers={MODEL_HEADER: model_sha256})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        request_log.open()
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)  # finishes the batch in flight off the event loop
            request_log.close()

    app = Starlette(routes=[
        api("/v1/completions", completions, ["POST"]),
        api("/v1/chat/completions", chat_completions, ["POST"]),
        api("/v1/models", models, ["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    return app


def serve(model_dir: Path, model_sha256: str, *, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None) -> None:
    """Serve the model until interrupted (Ctrl-C or SIGTERM finish the requests in flight)."""
    config = config or ServeConfig()
    if config.api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who reaches it can use the model; "
                    "pass an API key, or bind 127.0.0.1", host)
    app = create_app(model_dir, model_sha256, config)
    # The request log replaces uvicorn's access log: one line per request, with tokens and the model.
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
        where = ".".join(str(p) for p in error["loc"] if isinstance(p, int) or p in known) or "body"
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
