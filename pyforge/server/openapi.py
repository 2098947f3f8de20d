"""The API described: GET /openapi.json (OpenAPI 3.1) and Swagger UI at /swagger-ui and /docs.

The spec is built on its first request from the app's own router (falcon.inspect),
so every route served, /metrics included (added after build_app), has a path;
request bodies are server/schemas.py's, the dicts the routes check bodies
against, with this server's limits filled in (max_tokens at most
--max-tokens-limit, token ids below the smallest served vocabulary). Response objects are
described in components (completion, chat.completion, their stream chunks,
model list, /api replies, error). With API keys configured, the spec names
the two ways to send one (bearer, X-Api-Key); the health and docs paths are open
(app.OPEN_PATHS), as vLLM serves /docs and /openapi.json.

Swagger UI's files come from the swagger_ui_bundle package (swagger-ui-bundle-v2
on PyPI: Swagger UI 5, which reads OpenAPI 3.1), served under /swagger-ui/, never
from a CDN.
"""
import mimetypes
import re

import falcon
import falcon.inspect
from swagger_ui_bundle import swagger_ui_path

import pyforge
from pyforge.server import errors, schemas
from pyforge.server.errors import APIError

DOC_PATHS = ("/openapi.json", "/docs", "/swagger-ui")     # served without an API key (app.OPEN_PATHS)
_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")                # a Falcon field: {name} or {name:converter}


def add_routes(app, models):
    app.add_route("/openapi.json", Spec(app, models))
    ui = SwaggerUI()
    app.add_route("/swagger-ui", ui)
    app.add_route("/docs", ui)
    app.add_route("/swagger-ui/{name}", ui, suffix="asset")


class Spec:
    def __init__(self, app, models):
        self.app, self.models = app, models
        self.spec = None                # built at the first request: every route is added by then

    def on_get(self, req, resp):
        if self.spec is None:
            self.spec = build_spec(self.app, self.models)
        resp.media = self.spec


class SwaggerUI:
    def __init__(self):
        self.assets = {p.name: p for p in swagger_ui_path.iterdir() if p.is_file()}

    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_HTML
        resp.text = SWAGGER_PAGE

    def on_get_asset(self, req, resp, name):
        path = self.assets.get(name)       # only the package's own files: no path reaches anything else
        if path is None:
            raise APIError(404, f"no Swagger UI file {name[:100]!r}")
        resp.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        resp.cache_control = ["public", "max-age=86400"]
        resp.data = path.read_bytes()


SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>pyforge API</title>
  <link rel="stylesheet" type="text/css" href="/swagger-ui/swagger-ui.css">
  <link rel="icon" type="image/png" href="/swagger-ui/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/swagger-ui/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                                 presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
  </script>
</body>
</html>
"""


# -- the spec ------------------------------------------------------------------------------------

def build_spec(app, models):
    from pyforge.server import app as served      # (it imports this module)
    open_exact = frozenset(getattr(served, "OPEN_EXACT_PATHS", ()))
    config = models.config
    keyed = bool(config.api_keys)
    limits = {"max_tokens": config.max_tokens_limit,
              "max_token_id": min(ctx.tokenizer.vocab_size for ctx in models) - 1,
              "hidden_size": _one({ctx.facts.hidden_size for ctx in models})}
    bodies = _body_components(limits)
    path_examples = {"model": [ctx.model_name for ctx in models], "name": ["swagger-ui.css"]}
    paths = {}
    for route in falcon.inspect.inspect_routes(app):
        for method in route.methods:
            if method.internal:
                continue
            operation = _operation(route.path, method.method, bodies, path_examples)
            if keyed and (route.path in open_exact or route.path.startswith(served.OPEN_PATHS)):
                operation["security"] = []
            elif keyed:
                operation["responses"]["401"] = _error_ref(route.path)
            paths.setdefault(_PARAM.sub(r"{\1}", route.path), {})[method.method.lower()] = operation
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "pyforge", "version": pyforge.__version__,
                 "description": "An LLM inference server: OpenAI-compatible routes, the /api family, vLLM's "
                                "tokenizer routes. Unknown request fields are ignored; a field the server "
                                "does not honour is a 400 naming it. Served models: "
                                + ", ".join(ctx.model_name for ctx in models) + "."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {**bodies["schemas"], **RESPONSE_SCHEMAS},
                       "responses": {"Error": ERROR_RESPONSE, "AnthropicError": ANTHROPIC_ERROR_RESPONSE}},
    }
    if keyed:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}}
        spec["security"] = [{"bearer": []}, {"apiKey": []}]
    return spec


def _one(values):
    """The one value of a set, or None if it has several."""
    return next(iter(values)) if len(values) == 1 else None


def _body_components(limits):
    """{"schemas": {name: schema}, "refs": {route: $ref}}: each request schema once, named after its first route."""
    out, refs, names = {}, {}, {}
    for route, schema in schemas.REQUEST_BODIES.items():
        name = names.get(id(schema))
        if name is None:
            name = names[id(schema)] = "".join(w.capitalize() for w in re.split(r"[/_]", route) if w != "v1") \
                + "Request"
            out[name] = schemas.specialised(schema, **limits)
        refs[route] = {"$ref": f"#/components/schemas/{name}"}
    return {"schemas": out, "refs": refs}


def _operation(path, method, bodies, path_examples):
    doc = OPERATIONS.get((method, path)) or OPERATIONS.get((method, "/v1" + path)) or {}
    operation = {"operationId": _operation_id(method, path),
                 "summary": doc.get("summary", f"{method} {path}"),
                 "tags": [doc.get("tag") or _tag(path)],
                 "responses": {**doc.get("responses", {"200": {"description": "OK"}})}}
    if "description" in doc:
        operation["description"] = doc["description"]
    params = _PARAM.findall(path)
    if params:
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True,
             "schema": {"type": "string", **({"examples": path_examples[p]} if p in path_examples else {})}}
            for p in params]
    schema = schemas.body_schema(path)
    if method == "POST" and schema is not None:
        route = path if path in bodies["refs"] else "/v1" + path
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": bodies["refs"][route]}}}
        operation["responses"].update({status: _error_ref(path) for status in ("400", "404", "413", "415", "503")})
    operation["responses"].setdefault("default", _error_ref(path))
    return operation


def _error_ref(path):
    anthropic = getattr(errors, "ANTHROPIC_PATHS", ())
    if path in anthropic or path.startswith(tuple(p + "/" for p in anthropic)):
        return {"$ref": "#/components/responses/AnthropicError"}
    return {"$ref": "#/components/responses/Error"}


def _operation_id(method, path):
    return method.lower() + "_" + (re.sub(r"\W+", "_", _PARAM.sub(r"\1", path)).strip("_") or "root")


def _tag(path):
    if path.startswith("/api/"):
        return "/api"
    if path.startswith("/health") or path == "/metrics":
        return "operations"
    if path.startswith(DOC_PATHS):
        return "docs"
    if path.startswith("/v1/") or ("GET", "/v1" + path) in OPERATIONS or ("POST", "/v1" + path) in OPERATIONS:
        return "OpenAI-compatible"
    return "web"


# -- documented operations and response objects ----------------------------------------------------

def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description, schema_name, **more):
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}, **more}


def _events(chunk, done=True):
    """An SSE stream whose events carry JSON `chunk`s (or an error object), ending with [DONE] if `done`.
    OpenAPI 3.1 has a text/event-stream schema describe one event ({data, event, id})."""
    payload = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": payload} if done else {"type": "string", **payload}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _generation(description, whole, chunk, stream=True, done=True):
    content = {"application/json": {"schema": _ref(whole)}}
    if stream:
        content["text/event-stream"] = _events(chunk, done)
    return {"200": {"description": description, "content": content}}


_TEXT = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
_HTML = {"description": "Swagger UI", "content": {"text/html": {"schema": {"type": "string"}}}}
OPERATIONS = {   # (method, route) -> summary, tag, responses; a route without /v1 reads its /v1 entry
    ("POST", "/v1/completions"): {
        "summary": "Create a completion (OpenAI)",
        "responses": _generation("A text_completion, or with stream a text/event-stream of chunks", "Completion",
                                 "CompletionChunk")},
    ("POST", "/v1/chat/completions"): {
        "summary": "Create a chat completion (OpenAI)",
        "responses": _generation("A chat.completion, or with stream a text/event-stream of chunks",
                                 "ChatCompletion", "ChatCompletionChunk")},
    ("GET", "/v1/models"): {"summary": "List the served models", "responses": {"200": _json("OK", "ModelList")}},
    ("GET", "/v1/models/{model:path}"): {"summary": "Describe one served model",
                                        "responses": {"200": _json("OK", "Model")}},
    ("POST", "/v1/responses"): {
        "summary": "Create a response (OpenAI Responses API, stateless)",
        "responses": _generation("A response, or with stream its typed events", "Response", "ResponseEvent",
                                 done=False)},
    ("POST", "/v1/messages"): {"summary": "Create a message (Anthropic Messages API)", "tag": "Anthropic-compatible"},
    ("POST", "/v1/messages/count_tokens"): {"summary": "Count a message's input tokens (Anthropic Messages API)",
                                            "tag": "Anthropic-compatible"},
    ("POST", "/v1/embeddings"): {"summary": "Create embeddings (OpenAI)",
                                 "responses": {"200": _json("OK", "EmbeddingList")}},
    ("POST", "/tokenize"): {"summary": "Tokenize a prompt or chat messages (vLLM, llama-server)", "tag": "vLLM",
                            "responses": {"200": _json("OK", "TokenizeReply")}},
    ("POST", "/detokenize"): {"summary": "Token ids to text (vLLM, llama-server)", "tag": "vLLM",
                              "responses": {"200": _json("OK", "DetokenizeReply")}},
    **{("POST", route): {"summary": "Generate from one prompt",
                         "responses": _generation("{text, finish_reason, usage}", "ApiGenerateReply", "ApiChunk",
                                                  stream=False)}
       for route in ("/api/generate", "/api/completions")},
    ("POST", "/api/chat"): {"summary": "Chat: one reply",
                            "responses": _generation("{message, finish_reason, usage}", "ApiChatReply", "ApiChunk",
                                                     stream=False)},
    **{("POST", route): {"summary": "The same, streamed",
                         "responses": {"200": {"description": "data: {text} events, then one with finish_reason "
                                                              "and usage, then data: [DONE]",
                                               "content": {"text/event-stream": _events("ApiChunk")}}}}
       for route in ("/api/completions/stream", "/api/chat/stream")},
    ("GET", "/api/llms"): {"summary": "List the served models", "responses": {"200": _json("OK", "LlmList")}},
    ("GET", "/health"): {"summary": "Liveness", "responses": {"200": _json("Alive", "Health")}},
    ("GET", "/health/live"): {"summary": "Liveness", "responses": {"200": _json("Alive", "Health")}},
    ("GET", "/health/ready"): {"summary": "Readiness: every model's engine answers",
                               "responses": {"200": _json("Ready", "Readiness"),
                                             "503": _json("Not ready (loading, draining or an engine down)",
                                                          "Readiness")}},
    ("GET", "/metrics"): {"summary": "Prometheus metrics (vLLM's names, pyforge: prefix)",
                          "responses": {"200": _TEXT}},
    ("GET", "/openapi.json"): {"summary": "This document",
                               "responses": {"200": {"description": "OpenAPI 3.1", "content": {
                                   "application/json": {"schema": {"type": "object"}}}}}},
    ("GET", "/swagger-ui"): {"summary": "Swagger UI", "responses": {"200": _HTML}},
    ("GET", "/docs"): {"summary": "Swagger UI", "responses": {"200": _HTML}},
    ("GET", "/swagger-ui/{name}"): {"summary": "Swagger UI's files",
                                    "responses": {"200": {"description": "a file of the swagger-ui-bundle package",
                                                          "content": {"*/*": {}}}}},
}

_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_FINISH = {"enum": ["stop", "length", "tool_calls", "abort", None],
           "description": "stop (EOS, a stop string or token), length (max_tokens or the context), tool_calls, "
                          "abort"}


def _object(properties, required=None, **more):
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **more}


_TOP_LOGPROB = _object({"token": _STR, "logprob": _NUM, "bytes": {"type": "array", "items": _INT}})
_TOOL_CALL = _object({"id": _STR, "type": {"const": "function"},
                      "function": _object({"name": _STR, "arguments": _STR})})
_TOOL_CALL_DELTA = _object({"index": _INT, "id": _STR, "type": {"const": "function"},
                            "function": _object({"name": _STR, "arguments": _STR}, [])}, ["index"])
_COMPLETION_LOGPROBS = {"type": ["object", "null"], "properties": {
    "tokens": {"type": "array", "items": _STR}, "token_logprobs": {"type": "array", "items": _NUM},
    "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": _NUM}},
    "text_offset": {"type": "array", "items": _INT}}}
_CHAT_LOGPROBS = {"type": ["object", "null"], "properties": {"content": {
    "type": ["array", "null"],
    "items": {**_TOP_LOGPROB, "properties": {**_TOP_LOGPROB["properties"],
                                             "top_logprobs": {"type": "array", "items": _TOP_LOGPROB}}}}}}


def _completion_object(kind, choice, usage_nullable=False):
    return _object({"id": _STR, "object": {"const": kind}, "created": _INT, "model": _STR,
                    "choices": {"type": "array", "items": choice},
                    "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]} if usage_nullable else _ref("Usage")},
                   ["id", "object", "created", "model", "choices"])


RESPONSE_SCHEMAS = {
    "Error": _object({"error": _object({
        "message": _STR, "type": _STR, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}})},
        description="Every error (OpenAI's shape)"),
    "AnthropicError": _object({"type": {"const": "error"},
                               "error": _object({"type": _STR, "message": _STR}),
                               "request_id": _STR}, ["type", "error"],
                              description="Errors of the Anthropic-compatible routes"),
    "Usage": _object({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                      "prompt_tokens_details": _object({"cached_tokens": _INT},
                                                       description="cached: prompt tokens reused from the "
                                                                   "prefix cache")},
                     ["prompt_tokens", "completion_tokens", "total_tokens"]),
    "Completion": _completion_object("text_completion", _object({
        "index": _INT, "text": _STR, "finish_reason": _FINISH, "logprobs": _COMPLETION_LOGPROBS})),
    "CompletionChunk": _completion_object("text_completion", _object({
        "index": _INT, "text": _STR, "finish_reason": _FINISH, "logprobs": _COMPLETION_LOGPROBS},
        ["index", "text"]), usage_nullable=True),
    "ChatCompletion": _completion_object("chat.completion", _object({
        "index": _INT, "finish_reason": _FINISH, "logprobs": _CHAT_LOGPROBS,
        "message": _object({"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                            "reasoning_content": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array", "items": _TOOL_CALL}}, ["role", "content"])})),
    "ChatCompletionChunk": _completion_object("chat.completion.chunk", _object({
        "index": _INT, "finish_reason": _FINISH, "logprobs": _CHAT_LOGPROBS,
        "delta": _object({"role": {"const": "assistant"}, "content": _STR, "reasoning_content": _STR,
                          "tool_calls": {"type": "array", "items": _TOOL_CALL_DELTA}}, [])},
        ["index", "delta"]), usage_nullable=True),
    "Model": _object({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
                      "max_model_len": _INT}, ["id", "object"]),
    "ModelList": _object({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}),
    "ApiGenerateReply": _object({"text": _STR, "finish_reason": _FINISH, "usage": _ref("Usage")}),
    "ApiChatReply": _object({"message": _object({"role": {"const": "assistant"}, "content": _STR}),
                             "finish_reason": _FINISH, "usage": _ref("Usage")}),
    "ApiChunk": _object({"text": _STR, "finish_reason": _FINISH, "usage": _ref("Usage")}, ["text"]),
    "LlmList": _object({"llms": {"type": "array", "items": _object({"name": _STR, "context_length": _INT})}}),
    "Response": _object({"id": _STR, "object": {"const": "response"}, "created_at": _NUM, "status": _STR,
                         "model": _STR, "output": {"type": "array", "items": {"type": "object"}}},
                        ["id", "object", "status", "output"], description="An OpenAI Responses API response"),
    "ResponseEvent": _object({"type": _STR, "sequence_number": _INT}, ["type"],
                             description="response.created, response.output_text.delta, ..."),
    "TokenizeReply": {"type": "object", "required": ["tokens"], "description": "vLLM's {count, max_model_len, "
                      "tokens, token_strs} or llama-server's {tokens}",
                      "properties": {"count": _INT, "max_model_len": _INT, "tokens": {"type": "array"},
                                     "token_strs": {"type": ["array", "null"], "items": _STR}}},
    "EmbeddingList": _object({
        "object": {"const": "list"}, "model": _STR,
        "data": {"type": "array", "items": _object({
            "object": {"const": "embedding"}, "index": _INT,
            "embedding": {"anyOf": [{"type": "array", "items": _NUM}, _STR],
                          "description": "floats, or base64 of little-endian float32 (encoding_format)"}})},
        "usage": _object({"prompt_tokens": _INT, "total_tokens": _INT})}),
    "DetokenizeReply": _object({"prompt": _STR, "content": _STR}, ["prompt"]),
    "Health": _object({"status": _STR}),
    "Readiness": _object({"status": {"enum": ["ready", "not ready"]},
                          "models": {"type": "object", "additionalProperties": {"enum": ["ready", "not ready"]}}}),
}
ERROR_RESPONSE = _json("An error: 400 a request the server cannot take (param names the field), 401 a missing "
                       "or wrong API key, 404 an unknown model or route, 413 a body over the limit, 415 not "
                       "application/json, 503 overloaded (Retry-After) or not ready", "Error")
ANTHROPIC_ERROR_RESPONSE = _json("An error, in Anthropic's shape", "AnthropicError")
