"""OpenTelemetry traces: a span per generation request, exported over OTLP/HTTP.

    require(config)     at start-up: a clear error if otlp_endpoint is set and the SDK is missing
    start(config)       in each gunicorn worker, after its fork: its TracerProvider (None: no tracing)
    tracer(config)      the app's tracer (None: no tracing)
    GenerationSpan      one generation request's span, driven by logs.RequestLog

Optional: opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http (`pip install
'pyforge[otel]'`) are imported only when otlp_endpoint is set. The provider is made
per worker after the fork because BatchSpanProcessor exports from a thread, and
threads do not survive fork; the worker_exit hook flushes it. Its export delay
follows the SDK's environment (OTEL_BSP_SCHEDULE_DELAY, ...).

Spans follow the GenAI semantic conventions: named "{operation} {model}"
(chat | text_completion), kind SERVER (an incoming HTTP request), a child of the
client's W3C `traceparent` when it sends one. Status ERROR for 5xx only: per
the HTTP conventions, a client's 4xx is not the server's failure (error.type
still says it).
"""

# (attribute, the body fields that set it): recorded as the client sent them
REQUEST_FIELDS = (("gen_ai.request.max_tokens", ("max_completion_tokens", "max_tokens", "max_output_tokens")),
                  ("gen_ai.request.temperature", ("temperature",)),
                  ("gen_ai.request.top_p", ("top_p",)),
                  ("gen_ai.request.top_k", ("top_k",)),
                  ("gen_ai.request.seed", ("seed",)),
                  ("gen_ai.request.presence_penalty", ("presence_penalty",)),
                  ("gen_ai.request.frequency_penalty", ("frequency_penalty",)))


def require(config):
    if not config.otlp_endpoint:
        return
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        raise ValueError(f"otlp_endpoint is set ({config.otlp_endpoint}) but OpenTelemetry is not installed "
                           f"({e}); install it with: pip install 'pyforge[otel]'") from None


def start(config):
    """This process's TracerProvider, made the global one (OpenTelemetry's tracers look it up there)."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def tracer(config):
    if not config.otlp_endpoint:
        return None
    from opentelemetry import trace
    return trace.get_tracer("pyforge.server")     # a proxy until start() sets this process's provider


class GenerationSpan:
    def __init__(self, tracer, req):
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {name: req.get_header(name) for name in ("traceparent", "tracestate") if req.get_header(name)}
        self.operation = "chat" if "/chat" in req.path else "text_completion"
        self.span = tracer.start_span(
            self.operation, context=TraceContextTextMapPropagator().extract(carrier), kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": self.operation,
                        "gen_ai.provider.name": "pyforge",
                        "gen_ai.system": "pyforge",        # the name before semconv 1.37; backends still read it
                        "http.request.method": req.method, "url.path": req.path})

    def picked(self, model, body):
        requested = body.get("model")
        self.span.update_name(f"{self.operation} {model}")
        self.span.set_attribute("gen_ai.request.model", requested if isinstance(requested, str) else model)
        self.span.set_attribute("gen_ai.response.model", model)
        for attribute, fields in REQUEST_FIELDS:
            value = next((body[f] for f in fields if _number(body.get(f))), None)
            if value is not None:
                self.span.set_attribute(attribute, value)

    def first_token(self, seconds):
        self.span.set_attribute("gen_ai.server.time_to_first_token", seconds)
        self.span.add_event("gen_ai.first_token")

    def end(self, status, usage, finish_reasons):
        from opentelemetry.trace import Status, StatusCode

        attributes = {"http.response.status_code": status}
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.get("prompt_tokens", 0)
            attributes["gen_ai.usage.output_tokens"] = usage.get("completion_tokens", 0)
        if finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(finish_reasons)
        if status >= 400:
            attributes["error.type"] = str(status)
        self.span.set_attributes(attributes)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        self.span.end()


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
