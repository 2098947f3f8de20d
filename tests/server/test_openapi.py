"""GET /openapi.json and Swagger UI (server/openapi.py), and the request schemas the routes
check bodies against (server/schemas.py): in-process, over stories260K.

The spec must be valid OpenAPI 3.1 and list every route the app serves; every documented
request field must be accepted, alone and as null; a body that breaks a schema is a 400
naming the field; the schemas' bounds must be the hand checks' bounds (drift fails here);
Swagger UI's page loads only files the server itself serves.
"""
import re

import falcon.inspect
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

import pyforge
from conftest import STORIES, inprocess_app
from pyforge.engine.sampling_params import INT32_MAX, SamplingParams
from pyforge.server import schemas
from pyforge.server import validation as v
from pyforge.server.errors import APIError

CHAT = [{"role": "user", "content": "Hello"}]
# a minimal valid body per route, short generations
BASES = {
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 2},
    "/v1/chat/completions": {"messages": CHAT, "max_tokens": 2},
    "/api/completions": {"prompt": "Once upon a time", "max_tokens": 2},
    "/api/chat": {"messages": CHAT, "max_tokens": 2},
    "/v1/responses": {"input": "Hello", "max_output_tokens": 2},
    "/v1/messages": {"messages": CHAT, "max_tokens": 2},
    "/v1/messages/count_tokens": {"messages": CHAT},
    "/tokenize": {"prompt": "Hello"},
    "/detokenize": {"tokens": [1, 2]},
    "/v1/embeddings": {"input": "Hello"},
}
TOOLS = schemas.TOOLS["tools"]["examples"][0]
STORIES_HIDDEN_SIZE = 64


def with_field(route, body, field, value):
    """`body` with `field` set, and what that field needs beside it."""
    body = {**body, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "dimensions" and value is not None:
        body["dimensions"] = STORIES_HIDDEN_SIZE     # the one value accepted: the spec publishes it
    if field == "tool_choice" and route == "/v1/chat/completions":
        body["tools"] = TOOLS
    if route == "/tokenize" and field in ("messages", "content") and value is not None:
        del body["prompt"]              # one of prompt, messages, content
    if route == "/tokenize" and field == "prompt" and value is None:
        body["content"] = "Hello"
    return body


@pytest.fixture(scope="module")
def served():
    with inprocess_app(STORIES, chat_template="chatml", max_tokens_limit=8, default_max_tokens=8) as (app, engine):
        yield app, engine


@pytest.fixture(scope="module")
def spec(served):
    r = served[0].simulate_get("/openapi.json")
    assert r.status_code == 200
    return r.json


IDLE_AFTER_EACH_TEST = ("served",)     # conftest.engines_idle_after


def body_routes(spec):
    """Each request schema the app serves, once: {route: schema}."""
    seen, out = set(), {}
    for path, item in sorted(spec["paths"].items(), key=lambda pair: (not pair[0].startswith("/v1/"), pair[0])):
        body = item.get("post", {}).get("requestBody")
        if body is not None and body["content"]["application/json"]["schema"]["$ref"] not in seen:
            seen.add(body["content"]["application/json"]["schema"]["$ref"])
            out[path] = schemas.body_schema(path)
    return out


# -- the spec -----------------------------------------------------------------------------------

def test_the_spec_is_valid_openapi_3_1(spec):
    validate_openapi(spec)              # the OpenAPI 3.1 meta-schema, and every schema in it
    assert spec["openapi"].startswith("3.1") and spec["info"]["version"] == pyforge.__version__
    assert "securitySchemes" not in spec["components"]         # no keys configured
    completion = spec["paths"]["/v1/completions"]["post"]
    assert completion["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/CompletionsRequest"}
    assert set(completion["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    # this server's limits are in the published schema: --max-tokens-limit, the vocabulary
    request = spec["components"]["schemas"]["CompletionsRequest"]
    assert request["properties"]["max_tokens"]["maximum"] == 8
    assert request["properties"]["prompt"]["anyOf"][2]["items"]["maximum"] == 511
    dimensions = spec["components"]["schemas"]["EmbeddingsRequest"]["properties"]["dimensions"]
    assert dimensions["minimum"] == dimensions["maximum"] == dimensions["examples"][0] == STORIES_HIDDEN_SIZE
    assert spec["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"


def test_every_route_of_the_app_is_in_the_spec():
    with inprocess_app(STORIES) as (client, _):
        # a route added after build_app (as the launcher adds /metrics) is there too: the spec is built lazily
        client.app.add_route("/late", type("Late", (), {"on_get": lambda self, req, resp: None})())
        spec = client.simulate_get("/openapi.json").json
        routes = [(m.method, r.path) for r in falcon.inspect.inspect_routes(client.app) for m in r.methods
                  if not m.internal]
    assert len(routes) >= 25
    listed = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert {(method, re.sub(r"\{(\w+)(?::[^}]*)?\}", r"{\1}", path)) for method, path in routes} == listed
    assert ("GET", "/late") in listed
    assert {"/openapi.json", "/docs", "/swagger-ui", "/health/ready", "/v1/models/{model}"} <= set(spec["paths"])


def test_request_schemas_are_json_schemas_with_valid_examples():
    for route, schema in schemas.REQUEST_BODIES.items():
        Draft202012Validator.check_schema(schema)
        assert schema["description"] and schema["additionalProperties"] is True, route    # clients send extras
        for field, prop in schema["properties"].items():
            assert prop.get("description"), (route, field)
            if prop.get("type") != "null":
                assert prop.get("examples"), (route, field)
            for example in prop.get("examples", []):
                assert schemas.Validator(prop).is_valid(example), (route, field, example)


# -- bodies against the schemas -------------------------------------------------------------------

def test_every_documented_field_is_accepted_alone_and_as_null(served, spec):
    app = served[0]
    routes = body_routes(spec)
    assert {"/v1/completions", "/v1/chat/completions", "/api/completions", "/api/chat"} <= set(routes)
    for route, schema in routes.items():
        base = BASES[route]
        assert schemas.Validator(schema).is_valid(base)
        for field, prop in schema["properties"].items():
            cases = [("example", prop["examples"][0] if prop.get("examples") else None)]
            if field not in schema["required"]:
                cases.append(("null", None))
            for label, value in cases:
                r = app.simulate_post(route, json=with_field(route, base, field, value))
                if field == "suffix" and label == "example" and r.status_code == 400:
                    # honoured by fill-in-the-middle models only; stories260K has no FIM tokens
                    assert "fill-in-the-middle" in r.text
                    continue
                assert r.status_code == 200, (route, field, label, r.text[:300])


@pytest.mark.parametrize("route, body, param, words", [
    ("/v1/completions", {"max_tokens": 2}, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": ""}, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "a number"),
    ("/v1/completions", {"prompt": "x", "temperature": 100.5}, "temperature", "[0, 100]"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, "top_k", "an integer"),
    ("/v1/completions", {"prompt": "x", "n": 129}, "n", "1..128"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", 3]}, "stop", "stop[1] must be a string"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias", "token id"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "regex": "  "}, "regex", "blank"),
    ("/v1/completions", {"prompt": "x", "json_schema": True}, "json_schema", "an object"),   # llguidance: no
    ("/v1/completions", {"prompt": "x", "echo": 1}, "echo", "true or false"),
    ("/completions", {"prompt": "x", "min_tokens": -1}, "min_tokens", "in 0.."),     # an alias: the same schema
    ("/v1/completions", {"prompt": "x", "speculative.n_max": -1}, "speculative.n_max", "in 0.."),
    ("/v1/chat/completions", {"messages": CHAT, "speculative.n_max": "no"}, "speculative.n_max", "integer"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages", "messages[0].role is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "'text'"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "sometimes"}, "tool_choice", "required"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": []}, "chat_template_kwargs", "an object"),
    ("/api/generate", {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("/api/chat", {"messages": CHAT, "tools": []}, "tools", "null"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens", "tokens[1]"),
])
def test_a_body_that_breaks_the_schema_is_a_400_naming_the_field(served, route, body, param, words):
    r = served[0].simulate_post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json["error"]
    assert error["param"] == param and words in error["message"], error
    assert not served[1].has_work


def test_an_integral_number_is_an_integer(served):
    """JSON has one number type: 2.0 is the integer 2 to JSON Schema (and to vLLM), wherever
    the schema asks for an integer; 2.5 is not."""
    app = served[0]
    r = app.simulate_post("/v1/completions", json={"prompt": [[1.0, 2.0]], "max_tokens": 2.0, "n": 1.0,
                                                   "temperature": 0, "top_k": 5.0})
    assert r.status_code == 200 and r.json["usage"]["completion_tokens"] == 2, r.text
    r = app.simulate_post("/v1/completions", json={"prompt": "x", "max_tokens": 2.5})
    assert r.status_code == 400 and r.json["error"]["param"] == "max_tokens"


def test_more_generations_than_the_queue_holds_is_a_400_not_a_retry(served):
    """prompts x n past the queue's capacity can never be admitted: not a 503 that says retry."""
    app = served[0]
    r = app.simulate_post("/v1/completions", json={"prompt": ["a"] * 3, "n": 22, "max_tokens": 1})   # 66 > 64
    assert r.status_code == 400 and r.json["error"]["param"] == "n" and "64" in r.json["error"]["message"]
    r = app.simulate_post("/v1/completions", json={"prompt": ["a"] * 65, "max_tokens": 1})
    assert r.status_code == 400 and r.json["error"]["param"] == "prompt"
    r = app.simulate_post("/v1/completions", json={"prompt": ["a"] * 2, "n": 32, "max_tokens": 1})    # 64 fits
    assert r.status_code == 200 and len(r.json["choices"]) == 64


# -- the schemas' bounds are the hand checks' bounds ------------------------------------------------

def _hand(check):
    def accepts(value):
        try:
            check(value)
        except (ValueError, APIError):
            return False
        return True
    return accepts


HAND_CHECKS = {   # (schema, field) -> the hand check of one value
    ("completion", "temperature"): lambda x: SamplingParams(temperature=x),
    ("completion", "top_p"): lambda x: SamplingParams(top_p=x),
    ("completion", "top_k"): lambda x: SamplingParams(top_k=x),
    ("completion", "min_p"): lambda x: SamplingParams(min_p=x),
    ("completion", "presence_penalty"): lambda x: SamplingParams(presence_penalty=x),
    ("completion", "frequency_penalty"): lambda x: SamplingParams(frequency_penalty=x),
    ("completion", "repetition_penalty"): lambda x: SamplingParams(repetition_penalty=x),
    ("completion", "max_tokens"): lambda x: SamplingParams(max_tokens=x),
    ("completion", "min_tokens"): lambda x: SamplingParams(min_tokens=x, max_tokens=INT32_MAX),
    ("completion", "speculative.n_max"): lambda x: SamplingParams(max_drafts=x),
    ("completion", "n"): lambda x: v.parse_n({"n": x}),
    ("completion", "best_of"): lambda x: v.parse_best_of({"best_of": x}, 1, False),
    ("completion", "logprobs"): v.parse_completion_logprobs,
    ("chat", "top_logprobs"): lambda x: v.parse_chat_logprobs({"logprobs": True, "top_logprobs": x}),
    ("chat", "max_completion_tokens"): lambda x: SamplingParams(max_tokens=x),
}
ITEM_CHECKS = {   # fields whose items or values carry the bounds
    "stop_token_ids": (lambda prop: prop["items"], lambda x: SamplingParams(stop_token_ids=[x])),
    "logit_bias": (lambda prop: prop["additionalProperties"], lambda x: SamplingParams(logit_bias={1: x})),
}


def _edges(prop):
    """(value, whether it is in bounds) at each bound of a number schema."""
    step = 1 if "integer" in schemas._listed_types(prop) else 1e-6
    edges = []
    if "minimum" in prop:
        edges += [(prop["minimum"], True), (prop["minimum"] - step, False)]
    if "exclusiveMinimum" in prop:
        edges += [(prop["exclusiveMinimum"], False), (prop["exclusiveMinimum"] + step, True)]
    if "maximum" in prop:
        edges += [(prop["maximum"], True), (prop["maximum"] + step, False)]
    return edges


def test_the_schema_bounds_are_the_hand_checks_bounds():
    tables = {"completion": schemas.COMPLETION, "chat": schemas.CHAT_COMPLETION}
    checks = [(tables[table]["properties"][field], check) for (table, field), check in HAND_CHECKS.items()]
    checks += [(items(schemas.COMPLETION["properties"][field]), check) for field, (items, check) in
               ITEM_CHECKS.items()]
    bounded = 0
    for prop, check in checks:
        for value, inside in _edges(prop):
            assert schemas.Validator(prop).is_valid(value) is inside, (prop, value)
            assert _hand(check)(value) is inside, (prop.get("description"), value, inside)
            bounded += 1
    assert bounded >= 40
    # every bounded sampling field of the completion schema has its hand check listed above
    listed = {field for table, field in HAND_CHECKS if table == "completion"} | set(ITEM_CHECKS)
    assert {f for f, p in schemas.COMPLETION["properties"].items() if _edges(p)} <= listed


# -- Swagger UI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["/swagger-ui", "/docs"])
def test_swagger_ui_loads_only_files_served_here(served, page):
    app = served[0]
    r = app.simulate_get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert len(assets) >= 3 and '"/openapi.json"' in r.text
    for url in assets:
        assert url.startswith("/swagger-ui/"), url          # never a CDN
        asset = app.simulate_get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert app.simulate_get("/swagger-ui/swagger-ui-bundle.js").headers["content-type"].endswith("javascript")
    assert app.simulate_get("/swagger-ui/nothing.js").status_code == 404
    assert app.simulate_get("/swagger-ui/..%2F__init__.py").status_code == 404


def test_with_api_keys_the_docs_stay_open_and_the_spec_names_the_schemes():
    with inprocess_app(STORIES, api_key=("secret",)) as (app, _):
        assert app.simulate_get("/v1/models").status_code == 401
        for path in ("/openapi.json", "/docs", "/swagger-ui", "/swagger-ui/swagger-ui.css"):
            assert app.simulate_get(path).status_code == 200, path
        spec = app.simulate_get("/openapi.json").json
        assert app.simulate_get("/v1/models", headers={"X-Api-Key": "secret"}).status_code == 200
    validate_openapi(spec)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"}
    assert spec["components"]["securitySchemes"]["apiKey"]["name"] == "X-Api-Key"
    assert spec["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in spec["paths"]["/v1/models"]["get"] and "401" in spec["paths"]["/v1/models"]["get"][
        "responses"]
    for path in ("/health/ready", "/openapi.json", "/docs", "/swagger-ui/{name}"):
        assert spec["paths"][path]["get"]["security"] == [], path
