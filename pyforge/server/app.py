"""The Falcon WSGI app: routes, middleware, error handling.

    create_app(config, engine_client, tokenizer, observer=None) -> falcon.App

Cross-cutting concerns are middleware: request ids (`X-Request-Id`, echoed or
made up) and bearer-token auth when `config.api_key` is set (health endpoints
stay open so orchestrators can probe). Errors of every kind leave as
OpenAI-shaped JSON (errors.py).

`observer` is the metrics hook: on_request_start(), on_first_token(seconds),
on_token(n, seconds_since_last), on_request_end(status, seconds,
prompt_tokens, completion_tokens). A streamed request whose client left
early ends with status 499.
"""
import hmac
import re
import time
import uuid

import falcon

from pyforge.server import api_routes, errors, openai_routes
from pyforge.server.errors import APIError
from pyforge.server.generation import NoopObserver, ServingContext
from pyforge.structured import Constraints

OPEN_PATHS = ("/health",)       # path prefixes served without an API key
_REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}")


def create_app(config, engine_client, tokenizer, observer=None):
    """The app for one served model. A configured chat template replaces the
    tokenizer's own (the tokenizer object is changed in place)."""
    template = config.load_chat_template()
    if template is not None:
        tokenizer.chat_template = template
    ctx = ServingContext(config, engine_client, tokenizer, observer or NoopObserver(),
                         config.served_model_name, engine_client.facts, int(time.time()), Constraints(tokenizer))
    app = falcon.App(middleware=[RequestIdMiddleware(), AuthMiddleware(config.api_key)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    openai_routes.add_routes(app, ctx)
    api_routes.add_routes(app, ctx)
    add_health_routes(app, engine_client)
    return app


class RequestIdMiddleware:
    def process_request(self, req, resp):
        given = req.get_header("X-Request-Id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        req.context.request_id = request_id
        resp.set_header("X-Request-Id", request_id)


class AuthMiddleware:
    def __init__(self, api_key, open_paths=OPEN_PATHS):
        self.key = api_key.encode() if api_key else None
        self.open_paths = open_paths

    def process_request(self, req, resp):
        if self.key is None or req.path.startswith(self.open_paths):
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Live:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class Ready:
    def __init__(self, engine_client):
        self.client = engine_client

    def on_get(self, req, resp):
        if self.client.ready():
            resp.media = {"status": "ready"}
        else:
            resp.status = falcon.HTTP_503
            resp.media = {"status": "not ready"}


def add_health_routes(app, engine_client):
    app.add_route("/health", Live())
    app.add_route("/health/live", Live())
    app.add_route("/health/ready", Ready(engine_client))
