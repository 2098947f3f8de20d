"""Every error the app answers, its status and OpenAI shape; overload, auth,
health, keep-alives, and a good request finishing beside bad ones."""
import json
import threading
import time

import pytest
from falcon import testing

from conftest import STORIES
from pyforge.config import ServerConfig
from pyforge.engine.config import EngineFacts
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server.app import create_app
from pyforge.server.engine_client import (
    ADMITTED,
    ErrorEvent, FinishEvent, QueueFullError, RequestStream, TokenEvent,
)
from pyforge.server.inprocess import InProcessEngineClient

PROMPT = "Once upon a time"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def served():
    engine = Engine(STORIES, n_threads=1, max_model_len=256, kv_cache_tokens=4096)
    client = InProcessEngineClient(engine, queue_capacity=16)
    config = ServerConfig(model=STORIES, max_body_bytes=4096, max_tokens_limit=200, default_max_tokens=16)
    yield testing.TestClient(create_app(config, client, engine.tokenizer)), engine, client
    client.close()


@pytest.fixture(scope="module")
def app(served):
    return served[0]


class ScriptedClient:
    """An engine client that plays `script` ([(delay_s, event), ...]) to every stream,
    or raises `error` from submit."""

    def __init__(self, tokenizer, script=(), error=None, is_ready=True, timeout=600.0):
        self.facts = EngineFacts(256, tokenizer.vocab_size, tokenizer.eos_ids)
        self.script, self.error, self.is_ready, self.timeout = script, error, is_ready, timeout
        self.aborted = []

    def submit(self, prompt_ids, params):
        if self.error is not None:
            raise self.error
        stream = RequestStream(1, self.aborted.append, self.timeout)
        threading.Thread(target=self._play, args=(stream,), daemon=True).start()
        return stream

    def _play(self, stream):
        # as the real transports: admitted first, unless the engine refuses the request outright
        if not (self.script and isinstance(self.script[0][1], ErrorEvent)):
            stream.put(ADMITTED)
        for delay, event in self.script:
            time.sleep(delay)
            stream.put(event)

    def ready(self):
        return self.is_ready

    def stats(self):
        return {}


def scripted(tokenizer, config=None, **kwargs):
    config = config or ServerConfig(model=STORIES, keepalive_interval=0.05)
    return testing.TestClient(create_app(config, ScriptedClient(tokenizer, **kwargs), tokenizer))


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["param"] == param and error["code"] == code
    return error


# -- 400 ----------------------------------------------------------------------------

def test_invalid_json_and_non_object_bodies(app):
    r = app.simulate_post("/v1/completions", body="{not json", headers={"Content-Type": "application/json"})
    assert "not valid JSON" in assert_error(r, 400)["message"]
    assert_error(app.simulate_post("/v1/completions", json=[1, 2]), 400)


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("top_k", 1.5),
    ("min_p", 2), ("seed", "x"), ("max_tokens", 0), ("max_tokens", 201), ("max_tokens", True),
    ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0), ("n", 0), ("n", "2"),
    ("logprobs", 21), ("logprobs", True), ("stop", 5), ("stop", ["ok", 3]), ("ignore_eos", "yes"),
    ("echo", 1), ("stream", "true"), ("stream_options", []),
])
def test_bad_parameter_values(app, field, value):
    r = app.simulate_post("/v1/completions", json={"prompt": PROMPT, field: value})
    assert_error(r, 400, field)


@pytest.mark.parametrize("field, value", [
    ("logprobs", "yes"), ("top_logprobs", 3), ("messages", []), ("messages", "hi"),
    ("messages", [{"content": "no role"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
])
def test_bad_chat_fields(app, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    assert_error(app.simulate_post("/v1/chat/completions", json=body), 400, field)


@pytest.mark.parametrize("prompt", ["", [], [[]], [1, "a"], [-1], [10**6], None, {"text": "x"}])
def test_bad_or_empty_prompts(app, prompt):
    assert_error(app.simulate_post("/v1/completions", json={"prompt": prompt}), 400, "prompt")


def test_prompt_longer_than_the_context_is_rejected_not_truncated(app):
    r = app.simulate_post("/v1/completions", json={"prompt": [5] * 256})
    assert "maximum context length is 256" in assert_error(r, 400, "prompt", "context_length_exceeded")["message"]
    r = app.simulate_post("/v1/completions", json={"prompt": "once " * 300})
    assert_error(r, 400, "prompt", "context_length_exceeded")


def test_unknown_fields_are_ignored(app):
    r = app.simulate_post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "user": "u1",
                                                    "response_format": {"type": "text"}, "whatever": [1]})
    assert r.status_code == 200


# -- 401, 404, 405, 413 -------------------------------------------------------------

def test_api_key(served):
    _, engine, client = served
    app = testing.TestClient(create_app(ServerConfig(model=STORIES, api_key=KEY), client, engine.tokenizer))
    body = {"prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        r = app.simulate_post("/v1/completions", json=body, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
    assert_error(app.simulate_get("/v1/models"), 401, code="invalid_api_key")
    good = app.simulate_post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200
    for path in ("/health", "/health/live", "/health/ready"):
        assert app.simulate_get(path).status_code == 200


def test_unknown_model_route_and_method(app, served):
    _, engine, client = served
    r = app.simulate_post("/v1/completions", json={"model": "gpt-4", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json["model"] == "stories260K"     # one model: it answers any name
    assert_error(app.simulate_post("/v1/completions", json={"model": 7, "prompt": PROMPT}), 400, "model")
    strict = testing.TestClient(create_app(ServerConfig(model=STORIES, strict_model_name=True), client,
                                           engine.tokenizer))
    r = strict.simulate_post("/v1/completions", json={"model": "gpt-4", "prompt": PROMPT})
    assert_error(r, 404, "model", "model_not_found")
    assert "'stories260K'" in r.json["error"]["message"]
    # (a body that breaks the request schema is a 400 before the model is looked up, as with OpenAI)
    assert_error(strict.simulate_post("/v1/chat/completions", json={"model": "x", "messages": []}), 400, "messages")
    assert_error(strict.simulate_post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "user", "content": "hi"}]}), 404, "model", "model_not_found")
    assert_error(app.simulate_get("/v1/engines"), 404)
    assert_error(app.simulate_get("/v1/completions"), 405)
    assert_error(app.simulate_delete("/api/generate"), 405)


def test_body_over_the_limit(app):
    r = app.simulate_post("/v1/completions", json={"prompt": "x" * 5000})
    assert_error(r, 413)


def test_request_id_is_echoed_or_made(app):
    r = app.simulate_get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = app.simulate_get("/v1/nowhere", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32


# -- 503, 500, engine errors -----------------------------------------------------------

def test_queue_full_is_503_with_retry_after(served):
    tok = served[1].tokenizer
    r = scripted(tok, error=QueueFullError()).simulate_post("/v1/completions", json={"prompt": PROMPT})
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


def test_in_process_queue_capacity():
    engine = Engine(STORIES, n_threads=1, max_model_len=256, kv_cache_tokens=4096, max_num_seqs=1)
    step = engine.step
    engine.step = lambda: time.sleep(0.01) or step()    # the first request runs for seconds, not ms
    client = InProcessEngineClient(engine, queue_capacity=2)
    params = SamplingParams(max_tokens=240, ignore_eos=True)
    streams, rejected = [], 0
    for _ in range(6):
        try:
            streams.append(client.submit([1, 403], params))
        except QueueFullError:
            rejected += 1
    assert rejected >= 2 and len(streams) <= 4    # one running (or about to be), two waiting
    for stream in streams:
        stream.abort()
    assert all(isinstance(list(s)[-1], FinishEvent) for s in streams)
    client.close()
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_our_bug_is_a_generic_500(served):
    r = scripted(served[1].tokenizer, error=RuntimeError("secret internals")).simulate_post(
        "/v1/completions", json={"prompt": PROMPT})
    error = assert_error(r, 500)
    assert "secret" not in r.text and "Traceback" not in r.text and error["message"] == "internal server error"


def test_engine_error_event(served):
    tok = served[1].tokenizer
    client = scripted(tok, script=[(0, TokenEvent([403])), (0, ErrorEvent(400, "token id 9999 is outside"))])
    assert_error(client.simulate_post("/v1/completions", json={"prompt": PROMPT}), 400)
    r = client.simulate_post("/v1/completions", json={"prompt": PROMPT, "stream": True})
    frames = r.text.split("\n\n")
    assert r.status_code == 200 and frames[-2] == "data: [DONE]"
    assert json.loads(frames[-3][len("data: "):])["error"]["message"] == "token id 9999 is outside"


def test_a_lost_token_record_is_a_500_not_a_shorter_answer(served):
    """FINISH carries the engine's counts: fewer tokens arrived than it generated."""
    tok = served[1].tokenizer
    n_prompt = len(tok.encode(PROMPT))
    good = [(0, TokenEvent([403])), (0, TokenEvent([404])), (0, FinishEvent("length", n_prompt, 2))]
    r = scripted(tok, script=good).simulate_post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json["usage"]["completion_tokens"] == 2
    lost = [(0, TokenEvent([403])), (0, FinishEvent("length", n_prompt, 2))]
    error = assert_error(scripted(tok, script=lost).simulate_post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}), 500)
    assert "2 generated tokens" in error["message"] and "1 arrived" in error["message"]


def test_silent_engine_times_out_with_503(served):
    client = scripted(served[1].tokenizer, script=[], timeout=0.2)
    assert_error(client.simulate_post("/v1/completions", json={"prompt": PROMPT}), 503)


def test_keep_alive_comments_while_silent(served):
    client = scripted(served[1].tokenizer, script=[(0.3, TokenEvent([403])), (0, FinishEvent("length", 5, 1))])
    r = client.simulate_post("/v1/completions", json={"prompt": PROMPT, "stream": True})
    assert r.text.count(": keep-alive\n\n") >= 2 and r.text.endswith("data: [DONE]\n\n")


# -- health -------------------------------------------------------------------------

def test_health(served):
    app, engine, _ = served
    assert app.simulate_get("/health").json == {"status": "ok"}
    assert app.simulate_get("/health/live").status_code == 200
    assert app.simulate_get("/health/ready").status_code == 200
    not_ready = scripted(engine.tokenizer, is_ready=False)
    assert not_ready.simulate_get("/health/ready").status_code == 503
    assert not_ready.simulate_get("/health/live").status_code == 200


# -- concurrency --------------------------------------------------------------------

def test_good_request_completes_while_bad_ones_are_rejected(served):
    app, engine, _ = served
    result = {}

    def good():
        result["r"] = app.simulate_post("/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 150, "ignore_eos": True, "temperature": 0, "stream": True})

    thread = threading.Thread(target=good)
    thread.start()
    bad = [app.simulate_post("/v1/completions", json={"prompt": PROMPT, "temperature": "x"}) for _ in range(20)]
    thread.join(timeout=30)
    assert all(r.status_code == 400 for r in bad)
    assert result["r"].status_code == 200 and result["r"].text.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"length"' in result["r"].text
    assert not engine.has_work and engine.block_manager.num_free == engine.block_manager.n_blocks


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32-be"])
def test_a_lone_surrogate_escape_is_a_400_in_any_json_encoding(app, encoding):
    body = json.dumps({"prompt": "lone \ud800 here", "max_tokens": 2}).encode(encoding)
    r = app.simulate_post("/v1/completions", body=body, headers={"Content-Type": "application/json"})
    assert "surrogate" in assert_error(r, 400)["message"]
