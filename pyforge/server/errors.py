"""OpenAI-shaped errors: every error response, ours or Falcon's, has the body

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

except under ANTHROPIC_PATHS (the Messages API, server/messages_api.py), where the
same errors, with the same statuses, take Anthropic's shape:

    {"type": "error", "error": {"type": str, "message": str}, "request_id": str}

Resources raise `APIError` (an `HTTPError`); Falcon's own 404 / 405 pass
through the same serializer; anything else is our bug: logged with its
traceback, answered 500 with a generic message.
"""
import json
import logging

import falcon

log = logging.getLogger(__name__)

# status -> OpenAI error type: OpenAI calls every client error an
# invalid_request_error (401 included, with code invalid_api_key)
ERROR_TYPES = {500: "server_error", 503: "server_error", 504: "server_error"}
MAX_MESSAGE = 500   # characters: a message never carries a whole request value back
ANTHROPIC_PATHS = ("/v1/messages",)     # these routes, and the paths under them
# status -> Anthropic error type (any other 4xx: invalid_request_error, 5xx: api_error)
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                   504: "timeout_error"}


class APIError(falcon.HTTPError):
    def __init__(self, status, message, *, param=None, code=None, headers=None):
        super().__init__(falcon.code_to_http_status(status), description=message, headers=headers)
        self.param = param
        self.code = code


def bad_request(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


def error_body(status, message, param=None, code=None):
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def anthropic_error_body(status, message, request_id=None):
    default = "api_error" if status >= 500 else "invalid_request_error"
    body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, default), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def status_code(error):
    return int(str(error.status).split()[0])


def serialize_error(req, resp, error):
    """Falcon error serializer: every HTTPError as an OpenAI error body."""
    status = status_code(error)
    message = error.description or _default_message(req, error)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    resp.content_type = falcon.MEDIA_JSON
    if req.path in ANTHROPIC_PATHS or req.path.startswith(tuple(p + "/" for p in ANTHROPIC_PATHS)):
        resp.text = json.dumps(anthropic_error_body(status, message, req.context.get("request_id")))
        return
    resp.text = json.dumps(error_body(status, message, getattr(error, "param", None), getattr(error, "code", None)))


def _default_message(req, error):
    if isinstance(error, falcon.HTTPRouteNotFound):
        return f"Invalid URL ({req.method[:16]} {req.path[:200]})"
    if isinstance(error, falcon.HTTPMethodNotAllowed):
        return f"Method {req.method[:16]} is not allowed on {req.path[:200]}"
    return error.title


def handle_unexpected(req, resp, ex, params):
    """The catch-all handler: log the traceback, never show it."""
    if isinstance(ex, falcon.HTTPError):    # Falcon prefers the most specific handler, but be safe
        raise ex
    log.exception("unhandled error in %s %s (request %s)", req.method, req.path,
                  getattr(req.context, "request_id", "-"))
    raise APIError(500, "internal server error")


def install(app):
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
