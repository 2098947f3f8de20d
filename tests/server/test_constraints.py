"""Structured output through the routes (Falcon app -> in-process engine, a random-
weight model with a chat template): every request form constrains, streamed or not,
with n > 1, logprobs and stop strings; every bad constraint is a 400 naming its field."""
import json
import re

import pytest

from conftest import inprocess_app

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "The weather in Paris, as JSON?"}]


@pytest.fixture(scope="module")
def app(model_path):
    with inprocess_app(model_path) as app:
        yield app


def post(app, path, body):
    return app[0].simulate_post(path, json=body)


def chat(app, **fields):
    r = post(app, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 120, "temperature": 1.0, **fields})
    assert r.status_code == 200, r.text
    return r.json


def sse_chunks(result):
    return [json.loads(line[6:]) for line in result.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}},
    {"type": "json_schema", "schema": SCHEMA},          # llama-server's short form
    {"type": "json_object", "schema": SCHEMA},
], ids=["openai", "llama-server", "json_object+schema"])
def test_chat_response_format_schema(app, response_format):
    body = chat(app, response_format=response_format, n=3, seed=5)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_gives_an_object(app):
    for seed in range(3):
        content = chat(app, response_format={"type": "json_object"}, seed=seed, max_tokens=300)
        choice = content["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:       # an unbounded object may run out of tokens: then the client is told so
            assert choice["finish_reason"] == "length"


def test_streamed_constrained_chat_validates_and_has_logprobs(app):
    r = post(app, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 120, "temperature": 1.0, "seed": 2, "stream": True, "logprobs": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}})
    assert r.status_code == 200
    chunks = sse_chunks(r)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert any(c["choices"][0]["logprobs"] for c in chunks if c["choices"])


@pytest.mark.parametrize("fields, holds", [
    ({"regex": r"[0-9]{2}:[0-9]{2}"}, lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2}", t)),
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"grammar": 'root ::= "yes" | "no" | "n" [0-9]'}, lambda t: re.fullmatch(r"yes|no|n[0-9]", t)),
    ({"grammar": 'start: ITEM ("," ITEM){0,2}\nITEM: "a" | "b"'}, lambda t: re.fullmatch(r"[ab](,[ab]){0,2}", t)),
    ({"json_schema": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
     lambda t: isinstance(json.loads(t), list)),
    ({"structured_outputs": {"regex": r"[A-Z]{3}"}}, lambda t: re.fullmatch("[A-Z]{3}", t)),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ({"guided_json": {"enum": [1, 2, 3]}}, lambda t: json.loads(t) in (1, 2, 3)),
    ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
], ids=["regex", "choice", "gbnf", "lark", "json_schema", "so-regex", "so-choice", "guided_json", "guided_choice"])
def test_completions_forms(app, fields, holds):
    r = post(app, "/v1/completions", {"prompt": "Answer:", "max_tokens": 60, "temperature": 1.0, "n": 4, "seed": 3,
                                      **fields})
    assert r.status_code == 200, r.text
    for choice in r.json["choices"]:
        assert choice["finish_reason"] == "stop" and holds(choice["text"]), choice


def test_api_generate_takes_a_json_schema(app):
    r = post(app, "/api/generate", {"prompt": "Weather:", "max_tokens": 120, "temperature": 1.0, "seed": 1,
                                    "json_schema": SCHEMA})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json["text"]), SCHEMA)


def test_a_stop_string_still_cuts_a_constrained_answer(app):
    r = post(app, "/v1/completions", {"prompt": "x", "max_tokens": 60, "temperature": 0.0,
                                      "regex": "abc-def", "stop": ["-"]})
    assert r.status_code == 200 and r.json["choices"][0]["text"] == "abc"


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"regex": "(unclosed"}, "regex", "regex"),
    ({"grammar": "root ::= missing_rule"}, "grammar", "missing_rule"),
    ({"grammar": "start: undefined_rule"}, "grammar", "undefined_rule"),
    ({"choice": []}, "choice", "non-empty"),
    ({"choice": "yes"}, "choice", "list"),
    ({"json_schema": "not a schema"}, "json_schema", "object"),
    ({"regex": "[a-z]", "choice": ["a"]}, "choice", "one output constraint"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "json_schema", "missing"),
])
def test_bad_constraints_are_400_naming_the_field(app, fields, param, words):
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT})):
        r = post(app, path, {**base, "max_tokens": 5, **fields})
        assert r.status_code == 400, (path, fields, r.text)
        error = r.json["error"]
        assert error["param"] == param and words in error["message"], error
    assert not app[1].has_work


def test_api_chat_refuses_tools_rather_than_ignore_them(app):
    r = post(app, "/api/chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json["error"]["param"] == "tools"
