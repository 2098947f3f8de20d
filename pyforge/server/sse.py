"""Server-sent events over WSGI: `data: <json>\\n\\n` per event, `data: [DONE]` last.
Named events (OpenAI's Responses and Anthropic's Messages streams): an `event: <type>`
line before each data line, naming the event's `type` ("error" for an error body), and
no [DONE] (the last event says the end).

The body is a generator handed to Falcon as `resp.stream`; gunicorn writes
(and so flushes) every chunk it yields as it comes. Silence is broken by a
`: keep-alive` comment, so a dead client's socket errors out within one
interval. When the client goes away, gunicorn stops iterating and closes the
generator: `on_close` runs in its `finally` and aborts the request there.
The body runs in the context (contextvars) of the request that made it: its
log lines carry the request id and model after the app has returned.
"""
import contextvars
import json

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def encode(obj, named=False):
    data = b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    return b"event: " + obj.get("type", "error").encode() + b"\n" + data if named else data


def respond(resp, events, on_close, named=False):
    """Stream `events` (dicts; None for a keep-alive) as SSE, then [DONE] (`named`: named events)."""
    resp.content_type = "text/event-stream; charset=utf-8"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")     # no proxy buffering (nginx)
    resp.stream = SSEBody(events, on_close, named)


class SSEBody:
    """The WSGI body iterable. `on_close` runs exactly once: at the end, on an
    error, or when the server closes the body early (client gone) - even if
    iteration never started, which a plain generator's `finally` would miss."""

    def __init__(self, events, on_close, named=False):
        self._named = named
        self._frames = self._iterate(events)
        self._on_close = on_close
        self._closed = False
        self._context = contextvars.copy_context()

    def __iter__(self):
        return self

    def __next__(self):
        return self._context.run(next, self._frames)

    def close(self):
        self._context.run(self._close)

    def _close(self):
        try:
            self._frames.close()
        finally:
            self._finish()

    def _iterate(self, events):
        try:
            for event in events:
                yield KEEPALIVE if event is None else encode(event, self._named)
            if not self._named:
                yield DONE
        finally:
            getattr(events, "close", lambda: None)()    # run the producer's own cleanup now
            self._finish()

    def _finish(self):
        if not self._closed:
            self._closed = True
            self._on_close()
