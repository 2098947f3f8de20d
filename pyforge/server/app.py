"""The Falcon WSGI app: routes, middleware, error handling.

    create_app(config, engine_client, tokenizer, observer=None) -> falcon.App   (one model)
    build_app(config, [serving_context(...), ...]) -> falcon.App               (several)

Cross-cutting concerns are middleware: request ids (`X-Request-Id`, echoed or
made up), an access log line per request (logs.py; a generation's span: tracing.py)
and API-key auth when keys are configured (`Authorization: Bearer` or
`X-Api-Key`; health endpoints stay open so orchestrators can probe, the API docs
(/openapi.json, /docs: openapi.py) as vLLM serves them, and the playground page and
its files at their exact paths). Errors of
every kind leave as OpenAI-shaped JSON (errors.py; under /v1/messages, Anthropic-shaped).

`observer` is the metrics hook: on_request_start(), on_first_token(seconds),
on_token(n, seconds_since_last), on_request_end(status, seconds,
prompt_tokens, completion_tokens). A streamed request whose client left
early ends with status 499.
"""
import hmac
import logging
import re
import time
import uuid

import falcon

from pyforge.chat_template import CHATML_TEMPLATE
from pyforge.server import api_routes, errors, openai_routes, responses_api, tracing
from pyforge.server import embeddings, tokenize_routes
from pyforge.server import openapi
from pyforge.server import messages_api
from pyforge.server import playground
from pyforge.server.errors import APIError
from pyforge.server.generation import NoopObserver, ServingContext
from pyforge.server.logs import AccessLog
from pyforge.server.admission import AdmissionMiddleware
from pyforge.server.served import ServedModels
from pyforge.server.web import CorsMiddleware, GzipMiddleware
from pyforge.structured import Constraints

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", *openapi.DOC_PATHS)    # path prefixes served without an API key (docs: as vLLM)
OPEN_EXACT_PATHS = playground.PAGE_PATHS       # exact paths served without one: "/" must not open every path
_REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}")


def create_app(config, engine_client, tokenizer, observer=None):
    """The app for one served model."""
    return build_app(config, [serving_context(config, engine_client, tokenizer, observer)])


def serving_context(config, engine_client, tokenizer, observer=None):
    """What the routes need of one model (`config` is that model's). A configured chat
    template replaces the tokenizer's own, and a model with none gets ChatML, logged
    (the tokenizer object is changed in place)."""
    template = config.load_chat_template()
    if template is not None:
        tokenizer.chat_template = template
    elif not tokenizer.has_chat_template:
        log.warning("%s has no chat template: chat requests get ChatML (--chat-template sets another)",
                    config.served_model_name)
        tokenizer.chat_template = CHATML_TEMPLATE
    return ServingContext(config, engine_client, tokenizer, observer or NoopObserver(),
                          config.served_model_name, engine_client.facts, int(time.time()), Constraints(tokenizer))


def build_app(config, contexts, limit=None):
    """The app serving every model of `contexts`; `config` holds the server-wide settings;
    `limit` a ConcurrencyLimit (server/admission.py: the WSGI side wraps the app too)."""
    models = ServedModels(contexts, strict=config.strict_model_name)
    app = falcon.App(middleware=middleware(config) + ([AdmissionMiddleware(limit)] if limit else []))
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    openai_routes.add_routes(app, models)
    responses_api.add_routes(app, models)
    api_routes.add_routes(app, models)
    messages_api.add_routes(app, models)
    embeddings.add_routes(app, models)
    tokenize_routes.add_routes(app, models)
    if config.playground:
        playground.add_routes(app, models)
    add_health_routes(app, models)
    openapi.add_routes(app, models)     # its spec lists every route, read at its first request
    return app


def middleware(config):
    """Run in this order on the way in, reversed on the way out (gzip last: it sees the final body;
    CORS before auth: it answers preflights, which carry no key)."""
    cors = [CorsMiddleware(config.allowed_origins, config.allow_credentials, config.allowed_methods,
                           config.allowed_headers)] if config.allowed_origins else []
    return [GzipMiddleware(), RequestIdMiddleware(), AccessLog(tracing.tracer(config)), *cors,
            AuthMiddleware(config.api_keys)]


class RequestIdMiddleware:
    def process_request(self, req, resp):
        given = req.get_header("X-Request-Id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        req.context.request_id = request_id
        resp.set_header("X-Request-Id", request_id)


class AuthMiddleware:
    def __init__(self, api_keys, open_paths=OPEN_PATHS, open_exact_paths=OPEN_EXACT_PATHS):
        self.keys = [key.encode() for key in api_keys]
        self.open_paths = open_paths
        self.open_exact_paths = frozenset(open_exact_paths)

    def process_request(self, req, resp):
        if not self.keys or req.path in self.open_exact_paths or req.path.startswith(self.open_paths):
            return
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            return                      # a CORS preflight: browsers never send credentials on one
        if not self._accepted(self._presented(req)):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key> or X-Api-Key: <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _presented(req):
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
        return (req.get_header("X-Api-Key") or "").strip()

    def _accepted(self, token):
        token = token.encode()
        # compare_digest against every key: the time taken must not reveal which or how much matched
        return bool(token) & any([hmac.compare_digest(token, key) for key in self.keys])


class Live:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class Ready:
    """200 when every served model's engine is ready, else 503; each model's state either way."""

    def __init__(self, models):
        self.models = models

    def on_get(self, req, resp):
        states = {ctx.model_name: "ready" if ctx.client.ready() else "not ready" for ctx in self.models}
        ready = all(state == "ready" for state in states.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ready" if ready else "not ready", "models": states}


def add_health_routes(app, models):
    app.add_route("/health", Live())
    app.add_route("/health/live", Live())
    app.add_route("/health/ready", Ready(models))
