"""/v1 routes end to end: Falcon app -> InProcessEngineClient -> a real small Engine.

stories260K writes coherent text (stop strings, greedy equality); the synthetic
tiny-gqa model has a chat template (chat routes).
"""
import json

import pytest
from falcon import testing

from conftest import STORIES, wait_engine_idle
from pyforge.config import ServerConfig
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server.app import create_app
from pyforge.server.generation import StopMatcher
from pyforge.server.inprocess import InProcessEngineClient
from pyforge.synthetic import write_gguf

PROMPT = "Once upon a time"


def _engine(path):
    return Engine(str(path), n_threads=1, max_model_len=256, kv_cache_tokens=4096)


class Recorder:
    """An observer that keeps every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture(scope="module")
def stories():
    engine = _engine(STORIES)
    client = InProcessEngineClient(engine, queue_capacity=64)
    observer = Recorder()
    app = create_app(ServerConfig(model=STORIES, keepalive_interval=5.0), client, engine.tokenizer, observer)
    yield testing.TestClient(app), engine, observer
    client.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-gqa.gguf"
    write_gguf("tiny-gqa", path, "F32", seed=0)
    engine = _engine(path)
    client = InProcessEngineClient(engine, queue_capacity=64)
    yield testing.TestClient(create_app(ServerConfig(model=str(path)), client, engine.tokenizer)), engine
    client.close()


@pytest.fixture(scope="module")
def reference():
    """A second engine on the same file, driven directly (the served one belongs to its thread)."""
    return _engine(STORIES)


def greedy(engine, prompt, max_tokens):
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    outs = list(engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens)))
    return [o.token_id for o in outs], outs[-1].finish_reason


def sse_events(text):
    """The JSON payloads of an SSE body; asserts the framing and the final [DONE]."""
    frames = [f for f in text.split("\n\n") if f and not f.startswith(":")]
    assert text.endswith("data: [DONE]\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


IDLE_AFTER_EACH_TEST = ("stories", "tiny")     # conftest.engines_idle_after


# -- completions ----------------------------------------------------------------

def test_greedy_completion_equals_engine_generate(stories, reference):
    client, engine, _ = stories
    ids, reason = greedy(reference, PROMPT, 40)
    r = client.simulate_post("/v1/completions", json={
        "model": "stories260K", "prompt": PROMPT, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200
    body = r.json
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "stories260K" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == reference.tokenizer.decode(ids)
    assert choice["finish_reason"] == reason == "length"
    assert body["usage"] == {"prompt_tokens": len(engine.tokenizer.encode(PROMPT)), "completion_tokens": 40,
                             "total_tokens": len(engine.tokenizer.encode(PROMPT)) + 40,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_stream_matches_non_stream_and_frames_sse(stories):
    client, _, _ = stories
    request = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    full = client.simulate_post("/v1/completions", json=request).json
    r = client.simulate_post("/v1/completions", json={**request, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_include_usage_adds_a_final_usage_chunk(stories):
    client, engine, _ = stories
    r = client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)
    *text_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert last["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(PROMPT))
    assert all(c["usage"] is None for c in text_chunks)


def _boundary_stop(engine, ids):
    """A stop string that starts inside one token and ends inside a later one, and
    the text before its first occurrence."""
    tok = engine.tokenizer
    text = tok.decode(ids)
    for k in range(3, len(ids) - 2):
        cut = len(tok.decode(ids[:k]))      # a token boundary in the text
        stop = text[cut - 2:cut + 3]
        if len(stop) == 5 and text.find(stop) == cut - 2 and stop.strip() == stop:
            return stop, text[:cut - 2]
    raise AssertionError("no stop string across a token boundary found")


@pytest.mark.parametrize("text, stops, expected", [
    ("one two three", ["two"], "one "), ("aaab", ["aab"], "a"), ("abcabd", ["abd", "ca"], "ab"),
    ("no stop here", ["xyz", "herez"], "no stop here"), ("héllo wörld", ["ö"], "héllo w"),
])
def test_stop_matcher_every_split(text, stops, expected):
    """Whatever the token boundaries, the released text is the text before the first stop string."""
    for size in range(1, len(text) + 1):
        matcher, released, stopped = StopMatcher(stops), [], False
        for start in range(0, len(text), size):
            out, stopped = matcher.push(text[start:start + size])
            released.append(out)
            if stopped:
                break
        if not stopped:
            released.append(matcher.flush())
        assert "".join(released) == expected and stopped == (expected != text)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_token_boundaries(stories, reference, stream):
    client, _, _ = stories
    ids, _ = greedy(reference, PROMPT, 40)
    stop, expected = _boundary_stop(reference, ids)
    r = client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": ["never appears", stop], "stream": stream,
        "stream_options": {"include_usage": True}})
    if stream:
        *chunks, usage = sse_events(r.text)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
        usage = usage["usage"]
    else:
        choice = r.json["choices"][0]
        text, reason, usage = choice["text"], choice["finish_reason"], r.json["usage"]
    assert text == expected and reason == "stop"
    assert usage["completion_tokens"] < 40      # the request was aborted at the stop string


def test_n_choices_with_seed_are_distinct_and_reproducible(stories):
    client, _, _ = stories
    request = {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 7, "n": 2}
    first = client.simulate_post("/v1/completions", json=request).json
    again = client.simulate_post("/v1/completions", json=request).json
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts[0] != texts[1]
    assert first["usage"]["completion_tokens"] == 40


def test_prompt_forms_list_of_strings_and_token_ids(stories):
    client, engine, _ = stories
    ids = engine.tokenizer.encode(PROMPT)
    text_choice = client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json["choices"][0]["text"]
    for prompt, n_choices in (([PROMPT, "The cat"], 2), (ids, 1), ([ids, ids], 2)):
        body = client.simulate_post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 8, "temperature": 0}).json
        assert len(body["choices"]) == n_choices
        assert body["choices"][0]["text"] == text_choice
    assert body["usage"]["prompt_tokens"] == 2 * len(ids)


def test_echo_prepends_the_prompt(stories):
    client, _, _ = stories
    body = client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "echo": True}).json
    assert body["choices"][0]["text"].startswith(PROMPT + ",")


def test_completion_logprobs_shape(stories):
    client, _, _ = stories
    body = client.simulate_post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}).json
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]).lstrip() == body["choices"][0]["text"].lstrip()
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)   # greedy picks the most likely token
    assert lp["text_offset"] == sorted(lp["text_offset"])


# -- chat -----------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]


def test_chat_completion_and_stream_agree(tiny):
    client, engine = tiny
    tok = engine.tokenizer
    flat = [MESSAGES[0], {"role": "user", "content": "Say \nhi"}]     # text parts: one per line, as vLLM
    prompt_tokens = len(tok.encode(tok.apply_chat_template(flat)))
    request = {"model": "tiny-gqa", "messages": MESSAGES, "max_completion_tokens": 10, "temperature": 0}
    body = client.simulate_post("/v1/chat/completions", json=request).json
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == prompt_tokens and body["usage"]["completion_tokens"] == 10

    r = client.simulate_post("/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage = sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert {k: usage["usage"][k] for k in ("prompt_tokens", "completion_tokens")} == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 10}
    # the same prompt again: its full blocks come from the prefix cache
    cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // 16 * 16 > 0


def test_chat_logprobs_shape(tiny):
    client, _ = tiny
    body = client.simulate_post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}).json
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(entry["bytes"], list) and len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_chat_n2_stream_has_both_choices(tiny):
    client, _ = tiny
    r = client.simulate_post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 5, "n": 2, "seed": 1, "stream": True})
    chunks = sse_events(r.text)
    finished = {c["choices"][0]["index"] for c in chunks[1:] if c["choices"][0]["finish_reason"]}
    assert {c["index"] for c in chunks[0]["choices"]} == finished == {0, 1}


def test_configured_chat_template_serves_a_model_without_one(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    engine = _engine(STORIES)
    client = InProcessEngineClient(engine)
    try:
        app = testing.TestClient(create_app(ServerConfig(model=STORIES, chat_template=str(template)), client,
                                            engine.tokenizer))
        body = app.simulate_post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 5}).json
        expected = engine.tokenizer.encode("user: Tell a story\nassistant:")
        assert body["usage"]["prompt_tokens"] == len(expected) and body["usage"]["completion_tokens"] == 5
    finally:
        client.close()


# -- models, lifecycle ------------------------------------------------------------

def test_models(stories):
    client, _, _ = stories
    body = client.simulate_get("/v1/models").json
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "stories260K" and body["data"][0]["max_model_len"] == 256
    assert client.simulate_get("/v1/models/stories260K").json["id"] == "stories260K"
    assert client.simulate_get("/v1/models/other").status_code == 404


def test_client_disconnect_aborts_the_stream(stories):
    _, engine, observer = stories
    app = stories[0].app
    environ = testing.create_environ("/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                     body=json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                                                      "stream": True}))
    body = app(environ, lambda status, headers: None)
    assert next(body).startswith(b"data: ") and next(body).startswith(b"data: ")
    body.close()            # what gunicorn does when the client's socket is gone
    wait_engine_idle(engine)
    assert [c for c in observer.calls if c[0] == "on_request_end"][-1][1] == 499


def test_observer_sees_the_request(stories):
    client, _, observer = stories
    observer.calls.clear()
    client.simulate_post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    names = [c[0] for c in observer.calls]
    # tokens that arrive together are reported together: on_token(n, gap) adds up to the 3 tokens
    assert names[:3] == ["on_request_start", "on_first_token", "on_token"] and names[-1] == "on_request_end"
    assert set(names[2:-1]) == {"on_token"} and sum(c[1] for c in observer.calls[2:-1]) == 3
    assert observer.calls[-1][1] == 200 and observer.calls[-1][3:] == (5, 3)
