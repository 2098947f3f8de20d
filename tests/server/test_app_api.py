"""The in-house /api routes: same engine and validation as /v1, simpler shapes."""
import json

import pytest
from falcon import testing

from conftest import STORIES
from pyforge.config import ServerConfig
from pyforge.engine.engine import Engine
from pyforge.server.app import create_app
from pyforge.server.inprocess import InProcessEngineClient
from pyforge.synthetic import write_gguf

PROMPT = "Once upon a time"


def _serve(path):
    engine = Engine(str(path), n_threads=1, max_model_len=256, kv_cache_tokens=4096)
    client = InProcessEngineClient(engine, queue_capacity=16)
    return testing.TestClient(create_app(ServerConfig(model=str(path)), client, engine.tokenizer)), engine, client


@pytest.fixture(scope="module")
def stories():
    app, engine, client = _serve(STORIES)
    yield app, engine
    client.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-gqa.gguf"
    write_gguf("tiny-gqa", path, "F32", seed=0)
    app, engine, client = _serve(path)
    yield app, engine
    client.close()


IDLE_AFTER_EACH_TEST = ("stories", "tiny")     # conftest.engines_idle_after


def events(text):
    frames = [f for f in text.split("\n\n") if f and not f.startswith(":")]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


@pytest.mark.parametrize("route", ["/api/generate", "/api/completions"])
def test_generate_matches_v1(stories, route):
    client, engine = stories
    request = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    v1 = client.simulate_post("/v1/completions", json=request).json
    body = client.simulate_post(route, json={**request, "unknown_field": 1}).json
    assert set(body) == {"text", "finish_reason", "usage"}
    assert body["text"] == v1["choices"][0]["text"] and body["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(PROMPT))
    assert body["usage"]["completion_tokens"] == 20


def test_completions_stream(stories):
    client, _ = stories
    request = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": "girl"}
    full = client.simulate_post("/api/completions", json=request).json
    r = client.simulate_post("/api/completions/stream", json=request)
    assert r.headers["content-type"].startswith("text/event-stream")
    *texts, last = events(r.text)
    assert "".join(e["text"] for e in texts) == full["text"] and "girl" not in full["text"]
    assert last["text"] == "" and last["finish_reason"] == full["finish_reason"] == "stop"
    assert last["usage"] == full["usage"]


def test_chat_and_chat_stream(tiny):
    client, _ = tiny
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    body = client.simulate_post("/api/chat", json=request).json
    assert body["message"]["role"] == "assistant" and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    *texts, last = events(client.simulate_post("/api/chat/stream", json=request).text)
    assert "".join(e["text"] for e in texts) == body["message"]["content"]
    assert last["finish_reason"] == "length"


def test_llms(stories):
    client, _ = stories
    assert client.simulate_get("/api/llms").json == {"llms": [{"name": "stories260K", "context_length": 256}]}


def test_same_validation_as_v1(stories):
    client, _ = stories
    r = client.simulate_post("/api/generate", json={"prompt": PROMPT, "temperature": -1})
    assert r.status_code == 400 and r.json["error"]["param"] == "temperature"
    r = client.simulate_post("/api/generate", json={"prompt": PROMPT, "model": ["gpt-4"]})
    assert r.status_code == 400 and r.json["error"]["param"] == "model"
    r = client.simulate_post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                "continue_final_message": True, "add_generation_prompt": True})
    assert r.status_code == 400 and r.json["error"]["param"] == "continue_final_message"
    r = client.simulate_post("/api/generate", json={"prompt": [PROMPT, PROMPT]})
    assert r.status_code == 400 and r.json["error"]["param"] == "prompt"
