"""Traces (server/tracing.py): a real `pyforge serve --otlp-endpoint` exports its spans
over OTLP/HTTP to a real receiver on loopback, decoded as a collector would."""
import gzip
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from conftest import require_module  # noqa: E402
from live_server import REPO, Server, free_port  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf bodies, spans kept as dicts."""

    def __init__(self):
        # ships with the exporter (opentelemetry-proto): what a collector decodes
        pb = require_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
        self.spans = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                request = pb.ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    spans.extend(_span(span, resource) for scope in resource_spans.scope_spans for span in scope.spans)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, done, timeout=60.0):
        """Poll until done(spans) (the export runs on the worker's schedule); the spans either way."""
        deadline = time.monotonic() + timeout
        while not done(self.spans) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.spans

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def _attributes(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


def _span(span, resource):
    return {"name": span.name, "trace_id": span.trace_id.hex(), "parent_span_id": span.parent_span_id.hex(),
            "kind": span.kind, "attributes": _attributes(span.attributes), "status": span.status.code,
            "events": [e.name for e in span.events], "resource": resource}


@pytest.fixture(scope="module")
def traced(model_path):
    require_module("opentelemetry.sdk.trace")       # the server's side (pyforge[otel])
    receiver = Receiver()
    server = Server(model_path, "--otlp-endpoint", receiver.url, "--service-name", "forge-traces",
                    "--log-level", "info", env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    yield server, receiver
    assert server.stop() == 0
    server.assert_clean()
    receiver.close()


def _traceparent(span_id=PARENT_ID, trace_id=TRACE_ID):
    return f"00-{trace_id}-{span_id}-01"


def test_a_chat_span_reaches_the_collector_in_the_clients_trace(traced):
    server, receiver = traced
    r = server.client.chat.completions.create(
        model="tiny-gqa", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.5, top_p=0.9,
        extra_body={"ignore_eos": True}, extra_headers={"traceparent": _traceparent()})
    spans = receiver.wait_for(lambda spans: any(s["trace_id"] == TRACE_ID for s in spans))
    [span] = [s for s in spans if s["trace_id"] == TRACE_ID]
    assert span["name"] == "chat tiny-gqa" and span["parent_span_id"] == PARENT_ID
    assert span["kind"] == 2                            # SPAN_KIND_SERVER
    assert span["resource"]["service.name"] == "forge-traces"
    a = span["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "pyforge"
    assert a["gen_ai.request.model"] == "tiny-gqa" and a["gen_ai.response.model"] == "tiny-gqa"
    assert a["gen_ai.request.max_tokens"] == 4 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens and a["gen_ai.usage.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.server.time_to_first_token"] >= 0 and "gen_ai.first_token" in span["events"]
    assert a["http.response.status_code"] == 200 and span["status"] == 0      # STATUS_CODE_UNSET
    assert "gen_ai.request.seed" not in a                # not sent, not recorded


def test_a_stream_span_ends_with_the_stream(traced):
    server, receiver = traced
    trace_id = "11112222333344445555666677778888"
    chunks = list(server.client.completions.create(
        model="tiny-gqa", prompt="Once", max_tokens=6, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"traceparent": _traceparent(trace_id=trace_id)}))
    assert chunks
    spans = receiver.wait_for(lambda spans: any(s["trace_id"] == trace_id for s in spans))
    [span] = [s for s in spans if s["trace_id"] == trace_id]
    a = span["attributes"]
    # the usage and finish reason exist only once the last token went out: the span ended then
    assert span["name"] == "text_completion tiny-gqa" and a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.usage.output_tokens"] == 6 and a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["http.response.status_code"] == 200


def test_a_refused_request_has_its_status_on_the_span(traced):
    server, receiver = traced
    trace_id = "aaaabbbbccccddddeeeeffff00001111"
    request = urllib.request.Request(
        server.url + "/api/generate", data=json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
        headers={"Content-Type": "application/json", "traceparent": _traceparent(trace_id=trace_id)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400
    spans = receiver.wait_for(lambda spans: any(s["trace_id"] == trace_id for s in spans))
    [span] = [s for s in spans if s["trace_id"] == trace_id]
    a = span["attributes"]
    assert a["http.response.status_code"] == 400 and a["error.type"] == "400"
    assert span["status"] == 0          # a client's error: not the server's failure (HTTP semantic conventions)
    assert "gen_ai.usage.output_tokens" not in a


def test_no_span_for_other_routes_and_the_last_spans_are_flushed_at_exit(traced):
    server, receiver = traced
    other, last = "99998888777766665555444433332222", "12121212121212121212121212121212"
    for path in ("/health/ready", "/v1/models"):
        urllib.request.urlopen(urllib.request.Request(server.url + path,
                                                      headers={"traceparent": _traceparent(trace_id=other)}))
    server.client.completions.create(model="tiny-gqa", prompt="x", max_tokens=1,
                                     extra_headers={"traceparent": _traceparent(trace_id=last)})
    assert server.stop() == 0           # the workers exit: worker_exit flushes what they still hold
    spans = receiver.wait_for(lambda spans: any(s["trace_id"] == last for s in spans))
    assert [s["name"] for s in spans if s["trace_id"] == last] == ["text_completion tiny-gqa"]
    assert not [s for s in spans if s["trace_id"] == other]


def test_an_endpoint_without_the_packages_is_a_clear_start_up_error(model_path):
    # the SDK hidden from this one process: `import opentelemetry.sdk.trace` raises ImportError
    code = ("import sys; sys.modules['opentelemetry.sdk.trace'] = None; from pyforge.cli import main; "
            "main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "serve", "--model", model_path, "--port", str(free_port()),
                             "--otlp-endpoint", "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "otlp_endpoint is set" in result.stderr and "pip install 'pyforge[otel]'" in result.stderr
    assert "ready" not in result.stderr         # refused before any engine started
