"""Logging for every process of the server, and one access line per request.

    configure(level, fmt, service)   the launcher, gunicorn's arbiter and workers
                                     and the engine process all call this
    GunicornLogger                   gunicorn's logger class: its lines take the same road
    AccessLog                        middleware: a RequestLog per request, its line at the end

`json`: one object per line on stderr: timestamp (ISO 8601, UTC), level, logger,
message, service, pid; request_id and model when logged while serving a request
(context variables, so any logger called inside a request carries them);
exception when there is one; an access line adds its fields. `pretty`: one
readable line, for terminals.

Access lines (logger pyforge.access, info) carry method, path, status,
duration_ms, request_id, model, user (the client's end-user id, where the request
names one: the Messages API's metadata.user_id) and, for generation requests,
prompt_tokens, completion_tokens, cached_tokens and ttft_ms. A generation's RequestTimer
claims its RequestLog: the line is written at the generation's real end (an
SSE stream ends long after process_response). Health probes and /metrics
scrapes that succeed are logged at debug: orchestrators and Prometheus call
them every few seconds, and at info they would bury the traffic.
"""
import contextvars
import json
import logging
import sys
import time
from datetime import datetime, timezone

REQUEST_ID = contextvars.ContextVar("pyforge_request_id", default=None)
MODEL = contextvars.ContextVar("pyforge_model", default=None)
PRETTY = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
QUIET_PATHS = ("/health", "/metrics")       # polled by machines: debug while they succeed

access_log = logging.getLogger("pyforge.access")


def configure(level, fmt, service):
    """Send every logger of this process to one stderr handler in `fmt` ("json" or "pretty")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else logging.Formatter(PRETTY))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)           # warnings.warn lines go through the handler too


class JsonFormatter(logging.Formatter):
    def __init__(self, service):
        super().__init__()
        self.service = service

    def format(self, record):
        line = {"timestamp": datetime.fromtimestamp(record.created, timezone.utc)
                .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                "service": self.service, "pid": record.process}
        for key, var in (("request_id", REQUEST_ID), ("model", MODEL)):
            if var.get() is not None:
                line[key] = var.get()
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def gunicorn_logger_class():
    """gunicorn's Logger, minus its own stderr handler: its lines (gunicorn.error)
    reach the root handler that configure() installed, in the same format."""
    from gunicorn.glogging import Logger

    class GunicornLogger(Logger):
        def setup(self, cfg):
            super().setup(cfg)
            for log in (self.error_log, self.access_log):
                for handler in [h for h in log.handlers if getattr(h, "_gunicorn", False)]:
                    log.removeHandler(handler)
                log.propagate = True

    return GunicornLogger


class AccessLog:
    """Middleware (after RequestIdMiddleware): a RequestLog per request, the request
    id in the logging context, and the access line when the response leaves
    unless a generation claimed it. `tracer`: tracing.tracer(config) or None."""

    def __init__(self, tracer=None):
        self.tracer = tracer

    def process_request(self, req, resp):
        req.context.request_log = RequestLog(req, self.tracer)
        REQUEST_ID.set(req.context.get("request_id"))

    def process_response(self, req, resp, resource, req_succeeded):
        record = req.context.get("request_log")
        if record is not None and not record.claimed:
            record.end(int(resp.status_code))
        # gthread reuses threads (and their context): the next request must not inherit these
        REQUEST_ID.set(None)
        MODEL.set(None)


class RequestLog:
    """One request's access line, and its span when it is a generation (tracing.py)."""

    def __init__(self, req, tracer=None):
        self.method, self.path, self.request_id = req.method, req.path, req.context.get("request_id")
        self.start = time.perf_counter()
        self.tracer = tracer
        self.model = None
        self.user = None            # the end-user id the request names (metadata.user_id), if any
        self.span = None
        self.claimed = False

    @staticmethod
    def claim(req):
        """The request's RequestLog, now owned by a generation: its line (and span) end with it."""
        record = req.context.get("request_log") or RequestLog(req)     # an app built without AccessLog
        record.claimed = True
        if record.tracer is not None:
            from pyforge.server.tracing import GenerationSpan
            record.span = GenerationSpan(record.tracer, req)
        return record

    def picked(self, model, body):
        self.model = model
        MODEL.set(model)
        if self.span is not None:
            self.span.picked(model, body)

    def first_token(self, seconds):
        if self.span is not None:
            self.span.first_token(seconds)

    def end(self, status, usage=None, ttft=None, finish_reasons=()):
        fields = {"method": self.method, "path": self.path, "status": status,
                  "duration_ms": round((time.perf_counter() - self.start) * 1000, 1),
                  "request_id": self.request_id, "model": self.model,
                  "user": self.user if self.user is None or self.user.isprintable() else ascii(self.user)}
        if usage is not None:
            fields.update(prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0),
                          cached_tokens=usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))
        if ttft is not None:
            fields["ttft_ms"] = round(ttft * 1000, 1)
        fields = {k: v for k, v in fields.items() if v is not None}
        quiet = self.path.startswith(QUIET_PATHS) and status < 400
        path = self.path if self.path.isprintable() else ascii(self.path)     # no forged lines in pretty logs
        words = [self.method, path, str(status), f"{fields['duration_ms']} ms"]
        words += [f"{k}={v}" for k, v in fields.items() if k not in ("method", "path", "status", "duration_ms")]
        access_log.log(logging.DEBUG if quiet else logging.INFO, " ".join(words), extra={"fields": fields})
        if self.span is not None:
            self.span.end(status, usage, finish_reasons)
