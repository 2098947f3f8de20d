"""OpenAI-shaped errors: every error response, ours or Falcon's, has the body

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

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


def status_code(error):
    return int(str(error.status).split()[0])


def serialize_error(req, resp, error):
    """Falcon error serializer: every HTTPError as an OpenAI error body."""
    status = status_code(error)
    message = error.description or _default_message(req, error)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    resp.content_type = falcon.MEDIA_JSON
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
