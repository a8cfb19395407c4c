"""OpenTelemetry traces: one trace per job, across every process that touches it.

Off unless FARM_OTLP_ENDPOINT (OTLP over HTTP) or FARM_TRACE_FILE (spans as JSON lines) is set.
Off, ``span()`` hands back one shared empty context manager and ``carrier()`` an empty dict:
no SDK objects, no clock reads, nothing measurable on a stage (benchmarks/observe.py).

On, each process gets its own provider the first time it is set up (a prefork child again
after its fork: the parent's export thread does not survive one). The trace context travels
in each Celery message's headers (W3C ``traceparent``), never in its arguments, which stay
``(job_id, stage)``: submit is a trace's root, each stage a child of the stage (or submit)
that sent it, and a stage's input read, model call, checkpoint write and record commit are
its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from farm.config import Settings
from farm.errors import ConfigError

HEADERS = ("traceparent", "tracestate")  # what a message carries (W3C trace context)
# Seconds an export may take: a client exiting waits for its last spans, not a dead collector.
EXPORT_TIMEOUT_S = 5
_NOTHING = contextlib.nullcontext()
_tracer: trace.Tracer | None = None
_provider = None
_pid: int | None = None


def setup(settings: Settings, service: str) -> None:
    """Turn tracing on in this process if the settings ask for it (once per process).
    ConfigError when FARM_TRACE_FILE cannot be written."""
    global _tracer, _provider, _pid
    if _pid == os.getpid() or not (settings.otlp_endpoint or settings.trace_file):
        return
    if settings.trace_file:
        _check_writable(Path(settings.trace_file))
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": service, "host.name": socket.gethostname()})
    provider = TracerProvider(resource=resource)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = traces_url(settings.otlp_endpoint)
        exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if settings.trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(settings.trace_file)))
    _provider, _tracer, _pid = provider, provider.get_tracer("farm"), os.getpid()


def _check_writable(path: Path) -> None:
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(f"FARM_TRACE_FILE {path} cannot be written: {exc.strerror}") from None


def shutdown() -> None:
    """Export what is buffered (a worker or its child stopping)."""
    global _tracer, _provider, _pid
    if _provider is not None and _pid == os.getpid():
        _provider.shutdown()
    _tracer = _provider = _pid = None


def enabled() -> bool:
    return _tracer is not None and _pid == os.getpid()


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP collector's base URL (http://collector:4318) -> its traces path."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child of the current span; when tracing is off, nothing at all."""
    if not enabled():
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=_clean(attributes))


def annotate(**attributes: Any) -> None:
    """Add attributes to the current span (what became known after it started)."""
    if enabled():
        trace.get_current_span().set_attributes(_clean(attributes))


def rename(name: str) -> None:
    """Name the current span after what it turned out to be (a stage's function)."""
    if enabled():
        trace.get_current_span().update_name(name)


def carrier() -> dict[str, str]:
    """The current trace context as message headers (empty when off)."""
    if not enabled():
        return {}
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


@contextlib.contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context these headers carry the current one, for a stage's span."""
    if not enabled() or not headers:
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def headers_of(request: object) -> dict[str, str]:
    """The trace headers a Celery task's request came with."""
    return {name: value for name in HEADERS if (value := getattr(request, name, None))}


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float (and sequences of them); None is left out."""
    return {
        key: value if isinstance(value, str | bool | int | float) else str(value)
        for key, value in attributes.items()
        if value is not None
    }


class JsonLinesExporter:
    """Spans appended to a file, one JSON object a line: for one host's tests and debugging.
    Each batch is one write to a file opened for appending, so processes do not interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        text = "".join(json.dumps(_span_dict(s)) + "\n" for s in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(text)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_dict(span: Any) -> dict[str, Any]:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "service": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
    }
