"""Logs (server/logs.py): the JSON format, the request context every line inside a
request carries, one access line per request (a stream's at its real end), and a
real `pyforge serve --log-format json` whose every stderr line is JSON."""
import io
import json
import logging
import urllib.request

import pytest
from falcon import testing

from pyforge.config import ServerConfig
from pyforge.engine.engine import Engine
from pyforge.server.app import create_app
from pyforge.server.inprocess import InProcessEngineClient
from pyforge.server.logs import MODEL, REQUEST_ID, JsonFormatter

ACCESS_FIELDS = {"method", "path", "status", "duration_ms", "request_id", "model"}
TOKEN_FIELDS = {"prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms"}


class LoggingObserver:
    """A metrics observer that logs from inside the request (as any code serving it may)."""

    def __getattr__(self, name):
        return lambda *args: logging.getLogger("test.inside").info(name)


@pytest.fixture
def lines():
    """Every log line of this process while the test runs, as JSON objects (formatted when
    logged: the request context is read then)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("svc"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def served(model_path):
    engine = Engine(model_path, n_threads=1, max_model_len=256, kv_cache_tokens=4096)
    client = InProcessEngineClient(engine, queue_capacity=64)
    yield create_app(ServerConfig(model=model_path), client, engine.tokenizer, LoggingObserver())
    client.close()


def _access(lines):
    return [line for line in lines if line["logger"] == "pyforge.access"]


def test_json_lines_carry_the_request_context_and_exceptions(lines):
    log = logging.getLogger("test.plain")
    log.warning("outside %d", 1)
    REQUEST_ID.set("abc")
    MODEL.set("m")
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("inside")
    finally:
        REQUEST_ID.set(None)
        MODEL.set(None)
    outside, inside = lines()
    assert outside["message"] == "outside 1" and outside["level"] == "warning" and outside["logger"] == "test.plain"
    assert outside["service"] == "svc" and isinstance(outside["pid"], int)
    assert outside["timestamp"].endswith("Z") and "T" in outside["timestamp"]
    assert "request_id" not in outside and "exception" not in outside
    assert inside["request_id"] == "abc" and inside["model"] == "m"
    assert "RuntimeError: boom" in inside["exception"]


def test_a_generation_logs_one_access_line_and_its_inner_lines_carry_the_request(served, lines):
    client = testing.TestClient(served)
    r = client.simulate_post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True},
                             headers={"X-Request-Id": "req-1"})
    assert r.status_code == 200
    [access] = _access(lines())
    assert access["request_id"] == "req-1" and access["model"] == "tiny-gqa" and access["status"] == 200
    assert access["method"] == "POST" and access["path"] == "/v1/completions" and access["level"] == "info"
    assert access["completion_tokens"] == 4 and access["prompt_tokens"] == r.json["usage"]["prompt_tokens"]
    assert access["cached_tokens"] == 0 and access["ttft_ms"] >= 0 and access["duration_ms"] >= access["ttft_ms"]
    inside = [line for line in lines() if line["logger"] == "test.inside"]
    assert {line["message"] for line in inside} >= {"on_request_start", "on_first_token", "on_request_end"}
    # on_request_start runs before the model is picked: it has the request id only
    assert all(line["request_id"] == "req-1" for line in inside)
    assert all(line["model"] == "tiny-gqa" for line in inside if line["message"] != "on_request_start")
    logging.getLogger("test.after").info("after")
    assert "request_id" not in lines()[-1] and "model" not in lines()[-1]


def test_a_stream_is_logged_when_it_ends_not_when_the_app_returns(served, lines):
    env = testing.create_environ("/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 body=json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                  "ignore_eos": True, "stream": True}))
    start = testing.StartResponseMock()
    body = served(env, start)
    assert start.status == "200 OK" and _access(lines()) == []     # the app returned; the stream has not run
    request_id = start.headers_dict["X-Request-Id"]
    frames = iter(body)
    first = next(frames)
    assert first.startswith(b"data: ") and _access(lines()) == []      # streaming: not the end yet
    rest = b"".join(frames)
    body.close()
    assert rest.endswith(b"data: [DONE]\n\n")
    [access] = _access(lines())
    assert access["request_id"] == request_id and access["status"] == 200 and access["completion_tokens"] == 3
    assert TOKEN_FIELDS <= set(access)
    # the tokens were observed while the body ran, after the app returned: still in the request's context
    tokens = [line for line in lines() if line["message"] == "on_token"]
    assert tokens and all(line["request_id"] == request_id and line["model"] == "tiny-gqa" for line in tokens)


def test_every_route_gets_a_line_probes_at_debug(served, lines):
    client = testing.TestClient(served)
    client.simulate_get("/v1/models")
    client.simulate_get("/health/ready")
    client.simulate_post("/v1/completions", json={"prompt": "x", "max_tokens": -1})      # refused by the schema
    client.simulate_post("/v1/completions", json={"prompt": "x " * 5000})      # too long for the model
    client.simulate_get("/nowhere")
    models, health, malformed, bad, missing = _access(lines())
    assert (models["path"], models["status"], models["level"]) == ("/v1/models", 200, "info")
    assert (health["path"], health["status"], health["level"]) == ("/health/ready", 200, "debug")
    assert (malformed["status"], malformed["level"]) == (400, "info") and "model" not in malformed
    assert (bad["status"], bad["model"], bad["level"]) == (400, "tiny-gqa", "info")
    assert not TOKEN_FIELDS & set(models) and missing["status"] == 404
    assert all(ACCESS_FIELDS - {"model"} <= set(line) for line in (models, health, missing))


# -- a real server ---------------------------------------------------------------

def test_a_served_json_log_is_json_line_by_line(model_path):
    pytest.importorskip("openai")
    from live_server import Server

    server = Server(model_path, "--log-format", "json", "--log-level", "info", "--service-name", "forge-test")
    try:
        request = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "Hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            request_id = r.headers["X-Request-Id"]
        chunks = list(server.client.chat.completions.create(
            model="tiny-gqa", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "stream-1"}))
        assert chunks
        server.client.models.list()
        engine_pid = [p for p in server.pids_now() if "engine_process" in open(f"/proc/{p}/cmdline").read()][0]
    finally:
        assert server.stop() == 0       # every line written (workers flushed) before we read
    text = server.log()
    lines = [json.loads(line) for line in text.splitlines()]      # every line, or this raises
    assert all(line["service"] == "forge-test" and {"timestamp", "level", "logger", "message", "pid"} <= set(line)
               for line in lines)
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "pyforge.launcher", "pyforge.serving.engine_process", "pyforge.access"} <= loggers
    assert any(line["message"].startswith("Starting gunicorn") for line in lines)
    assert any(line["pid"] == engine_pid for line in lines)
    access = {line["request_id"]: line for line in lines if line["logger"] == "pyforge.access"}
    plain, stream = access[request_id], access["stream-1"]
    assert plain["path"] == "/v1/completions" and plain["status"] == 200 and plain["model"] == "tiny-gqa"
    assert stream["path"] == "/v1/chat/completions" and stream["completion_tokens"] == 5
    assert TOKEN_FIELDS <= set(plain) and TOKEN_FIELDS <= set(stream)
    assert any(line["path"] == "/v1/models" for line in access.values())
    server.assert_clean()
