"""POST /tokenize and /detokenize (vLLM's and llama-server's shapes), and the routes served at
the root as llama-server serves them: in-process for detail, a real `pyforge serve` with the
official `openai` client (base_url without /v1) for the aliases."""
import json

import openai
import pytest

from conftest import inprocess_app
from live_server import Server, post

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello </s> there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tiny(model_path):
    with inprocess_app(model_path, max_model_len=512, served_model_name="org/tiny-gqa") as served:
        yield served


IDLE_AFTER_EACH_TEST = ("tiny",)     # conftest.engines_idle_after


def tokenize(app, **body):
    r = app.simulate_post("/tokenize", json=body)
    assert r.status_code == 200, r.json
    return r.json


# -- vLLM's shapes ----------------------------------------------------------------------

def test_prompt_as_completions_encode_it(tiny):
    app, engine = tiny
    tok = engine.tokenizer
    body = tokenize(app, prompt="Hello world")
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id
    assert body == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    assert tokenize(app, prompt="Hello world", add_special_tokens=False)["tokens"] == ids[1:]
    strs = tokenize(app, prompt="Hello world", return_token_strs=True)["token_strs"]
    assert strs == ["<s>", "▁Hello", "▁world"]
    completion = app.simulate_post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 1}).json
    assert completion["usage"]["prompt_tokens"] == len(ids)


def test_messages_count_what_the_chat_route_counts(tiny):
    app, engine = tiny
    for extra in ({}, {"add_generation_prompt": False}, {"tools": TOOLS},
                  {"messages": [*MESSAGES, {"role": "assistant", "content": "Hi"}], "continue_final_message": True}):
        body = {"messages": MESSAGES, **extra}
        counted = tokenize(app, **body)
        chat = app.simulate_post("/v1/chat/completions", json={**body, "max_tokens": 1}).json
        assert counted["count"] == chat["usage"]["prompt_tokens"] == len(counted["tokens"]), extra
    with_bos, without = tokenize(app, messages=MESSAGES), tokenize(app, messages=MESSAGES, add_special_tokens=False)
    assert with_bos["tokens"] == [engine.tokenizer.bos_id, *without["tokens"]]
    assert engine.tokenizer.eos_id in without["tokens"]      # the template's </s>, and the user's own "</s>"


def test_no_length_limit_when_counting(tiny):
    app, _ = tiny
    body = tokenize(app, prompt="word " * 600)
    assert body["count"] > body["max_model_len"] == 512
    r = app.simulate_post("/v1/completions", json={"prompt": "word " * 600, "max_tokens": 1})
    assert r.status_code == 400 and r.json["error"]["code"] == "context_length_exceeded"


# -- llama-server's shapes --------------------------------------------------------------

def test_content_with_llama_server_flags(tiny):
    app, engine = tiny
    tok = engine.tokenizer
    plain = tok.encode("Hello world", add_bos=False)
    assert tokenize(app, content="Hello world") == {"tokens": plain}
    assert tokenize(app, content="Hello world", add_special=True) == {"tokens": [tok.bos_id, *plain]}
    assert tokenize(app, content="a </s>")["tokens"][-1] == tok.eos_id
    assert tok.eos_id not in tokenize(app, content="a </s>", parse_special=False)["tokens"]
    pieces = tokenize(app, content="Hi 😀", with_pieces=True)["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("Hi 😀", add_bos=False)
    assert pieces[0] == {"id": tok.token_to_id("▁Hi"), "piece": " Hi"}
    # the emoji is four byte tokens: each piece is a byte value list, not text
    assert [p["piece"] for p in pieces[-4:]] == [[b] for b in "😀".encode()]


# -- detokenize -------------------------------------------------------------------------

def test_detokenize_round_trip_in_both_shapes(tiny):
    app, engine = tiny
    ids = tokenize(app, prompt="Hello world")["tokens"]
    r = app.simulate_post("/detokenize", json={"tokens": ids})
    assert r.json == {"prompt": "<s> Hello world", "content": "<s> Hello world"}       # special tokens kept
    plain = tokenize(app, content="Grüße, 😀!")["tokens"]
    assert app.simulate_post("/detokenize", json={"tokens": plain}).json["content"] == "Grüße, 😀!"
    assert app.simulate_post("/detokenize", json={"tokens": []}).json["prompt"] == ""


@pytest.mark.parametrize("tokens", [[1, 32000], [-1], [1, True], [1.5], "1 2", None, [[1]]])
def test_ids_outside_the_vocabulary_are_400s(tiny, tokens):
    app, _ = tiny
    r = app.simulate_post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 400 and r.json["error"]["param"] == "tokens", r.json


@pytest.mark.parametrize("body, param", [
    ({}, None),
    ({"prompt": "a", "messages": MESSAGES}, None),
    ({"prompt": ["a"]}, "prompt"),
    ({"content": 7}, "content"),
    ({"prompt": "a", "return_token_strs": "yes"}, "return_token_strs"),
    ({"content": "a", "with_pieces": 1}, "with_pieces"),
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_tokenize_bodies_are_400s(tiny, body, param):
    app, _ = tiny
    r = app.simulate_post("/tokenize", json=body)
    assert r.status_code == 400, r.json
    if param is not None:
        assert r.json["error"]["param"] == param, r.json


def test_model_is_picked_as_for_generation(model_path):
    with inprocess_app(model_path, strict_model_name=True) as (app, _):
        r = app.simulate_post("/tokenize", json={"model": "nope", "prompt": "a"})
        assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
        assert app.simulate_post("/detokenize", json={"model": "tiny-gqa", "tokens": [1]}).status_code == 200


# -- routes without /v1 -----------------------------------------------------------------

def test_root_aliases_in_process(tiny):
    app, _ = tiny
    assert app.simulate_get("/models").json == app.simulate_get("/v1/models").json
    assert app.simulate_get("/models/org/tiny-gqa").json["id"] == "org/tiny-gqa"     # an id with a slash
    assert app.simulate_get("/models/nope").status_code == 404
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    assert app.simulate_post("/completions", json=body).json["choices"] == \
        app.simulate_post("/v1/completions", json=body).json["choices"]
    chat = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    assert app.simulate_post("/chat/completions", json=chat).json["choices"] == \
        app.simulate_post("/v1/chat/completions", json=chat).json["choices"]
    response = {"input": "Hello", "max_output_tokens": 3, "temperature": 0}
    assert app.simulate_post("/responses", json=response).json["output"][0]["content"] == \
        app.simulate_post("/v1/responses", json=response).json["output"][0]["content"]


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, workers=1)
    yield s
    assert s.stop() == 0
    s.assert_clean()


def test_openai_client_without_v1(server):
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-gqa"]
    assert client.models.retrieve("tiny-gqa").id == "tiny-gqa"
    messages = [{"role": "user", "content": "Hello"}]
    greedy = {"max_tokens": 4, "temperature": 0}
    r = client.chat.completions.create(model="tiny-gqa", messages=messages, **greedy)
    assert r.choices[0].message.content == \
        server.client.chat.completions.create(model="tiny-gqa", messages=messages, **greedy).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny-gqa", messages=messages, stream=True, **greedy))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert client.completions.create(model="tiny-gqa", prompt="Hello", **greedy).usage.completion_tokens == 4


def test_tokenize_live(server):
    status, counted = post(server.url + "/tokenize", json.dumps({"messages": MESSAGES}).encode())
    assert status == 200
    r = server.client.chat.completions.create(model="tiny-gqa", messages=MESSAGES, max_tokens=1)
    assert counted["count"] == r.usage.prompt_tokens
    status, text = post(server.url + "/detokenize", json.dumps({"tokens": counted["tokens"]}).encode())
    assert status == 200 and text["prompt"].endswith("<|assistant|>\n")
