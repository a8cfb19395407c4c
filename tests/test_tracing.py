"""Traces across real processes: a client submits, real cpu and gpu workers run the stages,
every process writes its spans (FARM_TRACE_FILE), and one job's spans form one trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from farm import tracing
from farm.config import Settings
from farm.errors import ConfigError
from tests.helpers import sample_png, wait_until

SUBMIT = """
import sys
from farm import Farm
job = Farm.from_env().submit(sys.argv[1], size=64, steps=4, prompt="traced", seed=3)
print(job.id)
"""
IMG2IMG = ("preprocess", "encode", "noise", "denoise", "decode", "postprocess")


def submit_from_a_client(env: dict[str, str], image: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT, str(image)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.split()[-1]


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def traced_workers(running, workers, tmp_path):
    """The cpu and gpu workers, replaced by ones writing spans to a file."""
    spans = tmp_path / "spans.jsonl"
    try:
        workers.replace_all("cpu", FARM_TRACE_FILE=str(spans))
        workers.replace_all("gpu", FARM_TRACE_FILE=str(spans))
        yield spans
    finally:
        workers.replace_all("cpu")
        workers.replace_all("gpu")


def test_one_jobs_spans_form_one_trace_across_processes(farm, farm_env, traced_workers, tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(sample_png(hue=77))
    job_id = submit_from_a_client({**farm_env, "FARM_TRACE_FILE": str(traced_workers)}, image)
    assert farm.get(job_id).wait(timeout=180).status == "done"

    def finished() -> bool:  # a stage's span ends just after its record commits
        names = {s["name"] for s in read_spans(traced_workers)}
        return "stage postprocess" in names

    wait_until(finished, 30, "the last stage's span")
    spans = read_spans(traced_workers)
    (root,) = [s for s in spans if s["name"] == "submit"]
    assert root["parent_id"] is None and root["attributes"]["farm.job_id"] == job_id
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    by_id = {s["span_id"]: s for s in trace}
    # one tree: every span but the submit has its parent in the same trace
    assert all(s["parent_id"] in by_id for s in trace if s is not root)
    stages = {s["attributes"]["farm.stage"]: s for s in trace if s["name"].startswith("stage ")}
    assert sorted(stages) == sorted(IMG2IMG)
    for name, span in stages.items():
        attrs = span["attributes"]
        assert span["name"] == f"stage {name}"
        assert attrs["farm.job_id"] == job_id and attrs["farm.attempt"] == 1
        assert attrs["farm.outcome"] == "done" and attrs["farm.worker"]
        children = Counter(s["name"] for s in trace if s["parent_id"] == span["span_id"])
        for child in ("record begin", "input read", "checkpoint write", "record commit"):
            assert children[child] == 1, (name, children)
        work = "model call" if name in ("encode", "noise", "denoise", "decode") else "compute"
        assert children[work] == 1, (name, children)
    # each stage is a child of the one that sent or continued it, across processes
    parents = dict(zip(IMG2IMG[1:], IMG2IMG[:-1], strict=True))
    for stage, parent in parents.items():
        assert by_id[stages[stage]["parent_id"]] is stages[parent]
    assert by_id[stages["preprocess"]["parent_id"]] is root
    services = {s["service"] for s in trace}
    assert services == {"farm-client", "farm-worker-cpu", "farm-worker-gpu"}
    assert len({s["pid"] for s in trace}) >= 3  # client, a cpu child, the gpu worker


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_spans_go_to_an_otlp_collector_over_http(farm_env, running, tmp_path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = tmp_path / "in.png"
    image.write_bytes(sample_png(hue=78))
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        job_id = submit_from_a_client({**farm_env, "FARM_OTLP_ENDPOINT": endpoint}, image)
    finally:
        server.shutdown()
    # the client's spans, exported as it exited
    (path, content_type, body), *_ = _Collector.received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    (submit,) = [s for s in spans if s.name == "submit"]
    attrs = {a.key: a.value.string_value for a in submit.attributes}
    assert attrs["farm.job_id"] == job_id


def test_off_by_default_and_then_nothing_is_made() -> None:
    settings = Settings(broker_url="redis://h/0", redis_url="redis://h/0",
                        database_url="postgresql+psycopg2://u:p@h/d")  # fmt: skip
    tracing.setup(settings, "test")
    assert not tracing.enabled()
    assert tracing.span("stage") is tracing.span("input read")  # one shared empty context
    assert tracing.carrier() == {}
    with tracing.continued({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
        assert tracing.carrier() == {}


def test_a_span_file_that_cannot_be_written_is_one_clear_error(tmp_path) -> None:
    settings = Settings(broker_url="redis://h/0", redis_url="redis://h/0",
                        database_url="postgresql+psycopg2://u:p@h/d",
                        trace_file=tmp_path / "no-such-dir" / "spans.jsonl")  # fmt: skip
    with pytest.raises(ConfigError, match=r"FARM_TRACE_FILE .* cannot be written"):
        tracing.setup(settings, "test")
    assert not tracing.enabled()


def test_collector_url() -> None:
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.traces_url("https://c/v1/traces") == "https://c/v1/traces"
