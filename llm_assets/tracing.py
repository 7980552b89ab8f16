"""OpenTelemetry traces: one trace per Dagster run, a span per step, its materialization (or gate
verdict) and the step's heavy phases; and a span per request of the model server.

Work code marks its phases with `phase(name)` (a child span of the step's current span, a no-op
outside a traced step), so it never receives a tracer. A worker process times its phases with
`PhaseClock` and reports them; the step replays them as spans (`StepTrace.replay`).

Exported with the OpenTelemetry SDK over OTLP/HTTP to the endpoint of the standard variables
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; headers,
timeout and service name from their `OTEL_*` variables too): MLflow's `/v1/traces` or any
collector. With neither variable set, nothing is traced and nothing is imported beyond the API.
No Dagster here (docs/tracking.md).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SERVICE_NAME = "llm-assets"
# How long the end of a step waits for its spans to leave (a slow or dead collector costs at most this).
FLUSH_TIMEOUT_MS = 5_000

Attributes = Mapping[str, str | bool | int | float]
# A phase a worker timed: (name, start, end), wall-clock nanoseconds since the epoch.
TimedPhase = tuple[str, int, int]
# Where a build returns the phases its worker timed; the step turns them into spans, not metadata.
REPORTED_PHASES = "phases"


def enabled() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def run_trace_id(run_id: str) -> int:
    """The trace id of a Dagster run: its run id (a UUID, 128 bits like a trace id), so every step
    process of one run (the multiprocess and k8s executors run each step in its own) lands in the
    same trace without passing anything between them."""
    try:
        return uuid.UUID(run_id).int or 1
    except ValueError:
        return int(hashlib.sha256(run_id.encode()).hexdigest()[:32], 16) or 1


def _provider(trace_id: int | None) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RunIds(RandomIdGenerator):
        """New root spans join the run's trace; span ids stay random."""

        def generate_trace_id(self) -> int:
            return trace_id if trace_id is not None else super().generate_trace_id()

    # Resource.create adds OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over the default name.
    provider = TracerProvider(id_generator=RunIds(), resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class StepTrace:
    """The spans of one step: the step's own (root of its part of the run's trace) and children."""

    def __init__(self, tracer: trace.Tracer, step: trace.Span):
        self.tracer = tracer
        self.step = step

    @contextmanager
    def span(self, name: str, attributes: Attributes | None = None) -> Iterator[trace.Span]:
        """A child of whatever span is current (the step's, the materialization's)."""
        with self.tracer.start_as_current_span(name, attributes=dict(attributes or {})) as span:
            yield span

    def replay(self, phases: Sequence[Sequence[Any]]) -> None:
        """Spans for the phases a worker process timed (`PhaseClock.phases`), children of the
        current span, at the times the worker measured them."""
        for name, start, end in phases:
            span = self.tracer.start_span(str(name), start_time=int(start))
            span.end(end_time=int(end))


# The traced step this thread runs, so that `phase` finds it without being handed it.
_current_step: ContextVar[StepTrace | None] = ContextVar("llm_assets_step_trace", default=None)


@contextmanager
def phase(name: str, attributes: Attributes | None = None) -> Iterator[None]:
    """A span for a heavy phase of the work (``with tracing.phase("train"):``), a child of the
    traced step's current span; a no-op outside a traced step (a test, a worker process)."""
    traced = _current_step.get()
    if traced is None:
        yield
        return
    with traced.span(name, attributes):
        yield


class PhaseClock:
    """The phases of a worker process, which has no span of its step to open children under:
    timed here, reported with its figures, and replayed as spans by the step (`StepTrace.replay`)."""

    def __init__(self) -> None:
        self.phases: list[TimedPhase] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time_ns()
        try:
            yield
        finally:
            self.phases.append((name, start, time.time_ns()))


@contextmanager
def step_trace(run_id: str, step_key: str, attributes: Attributes | None = None) -> Iterator[StepTrace]:
    """The span of one Dagster step in the run's trace; its spans are exported when it ends. With
    no OTLP endpoint set, every span is a no-op."""
    if not enabled():
        tracer = trace.NoOpTracer()
        with tracer.start_as_current_span(step_key) as span:
            yield StepTrace(tracer, span)
        return
    provider = _provider(run_trace_id(run_id))
    tracer = provider.get_tracer(__name__)
    try:
        with tracer.start_as_current_span(
            f"step {step_key}", attributes={"dagster.run_id": run_id, "dagster.step": step_key, **(attributes or {})}
        ) as span:
            traced = StepTrace(tracer, span)
            token = _current_step.set(traced)
            try:
                yield traced
            finally:
                _current_step.reset(token)
    finally:
        # Exported before the step's process may end; an unreachable collector is logged by the
        # exporter and costs at most the flush timeout.
        provider.force_flush(FLUSH_TIMEOUT_MS)
        provider.shutdown()


class RequestTracer:
    """The server spans of one model server, from its start to its stop: ``close`` (at the end of
    the app's lifespan) exports what is left. A no-op when no OTLP endpoint is set at its start."""

    def __init__(self) -> None:
        self._provider = _provider(None) if enabled() else None
        self._tracer = self._provider.get_tracer(__name__) if self._provider is not None else trace.NoOpTracer()

    @contextmanager
    def request_span(self, method: str, route: str, attributes: Attributes | None = None) -> Iterator[trace.Span]:
        """A server span for one request (a trace of its own), named as OpenTelemetry's HTTP
        conventions name it, e.g. ``with tracer.request_span("POST", "/v1/completions") as span:``;
        set figures known later (status, tokens) with ``span.set_attribute``."""
        with self._tracer.start_as_current_span(f"{method} {route}", kind=trace.SpanKind.SERVER, attributes={
            "http.request.method": method, "http.route": route, **(attributes or {})}) as span:
            yield span

    def close(self) -> None:
        """Export the spans still queued (waits at most the flush timeout on a dead collector)."""
        if self._provider is not None:
            self._provider.force_flush(FLUSH_TIMEOUT_MS)
            self._provider.shutdown()
