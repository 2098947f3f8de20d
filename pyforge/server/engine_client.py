"""What the HTTP app needs from an engine, and the stream a request reads.

The app talks to the engine only through `EngineClient`: `InProcessEngineClient`
(inprocess.py) runs an `Engine` in a thread of the same process; the serving
transport runs it in the engine process behind shared-memory rings. Both hand
back a `RequestStream` per submitted prompt and feed it events from whatever
thread receives them:

    AdmittedEvent  then  TokenEvent*  then exactly one  FinishEvent | ErrorEvent
    (or ErrorEvent alone: the engine refused the request); a request whose params
    ask for prompt_logprobs gets PromptLogprobsEvents before its first TokenEvent;
    an embedding request (params.pooling set) gets one EmbeddingEvent and no tokens

The AdmittedEvent says the engine took the request into its queue: a stream
waits for it before its status line, so a refusal is still a plain 503/400.

After `abort()` the producer still sends the FinishEvent (reason "abort"), as
the IPC contract in `pyforge/ipc/records.py` does; readers need not wait for it.

`StreamGroup` reads several streams as one (n choices, several prompts) and
guards every wait with timeouts, so an engine that dies silently cannot hang
an HTTP worker thread forever. A reader that falls behind gets what piled up
at once: a stream's tokens that arrive before its reader takes them join one
run, read as one TokenEvent (tokens, logprobs and top logprobs in order), so
a slow client or a busy worker pays its per-event costs (a wake-up, an SSE
write, a JSON chunk) once per batch of tokens rather than once per token, as
vLLM and llama-server do. A final event closes the run before it.
"""
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from pyforge.engine.config import EngineFacts
from pyforge.engine.errors import ErrorKind
from pyforge.engine.sampling_params import SamplingParams

DEFAULT_STALL_TIMEOUT = 600.0   # seconds without any event before a request is given up
ABORT_GRACE = 2.0               # how long to wait for the FinishEvent an abort promises


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]
    logprobs: list[float] | None = None                    # one per token, if requested
    top_logprobs: list[list[tuple[int, float]]] | None = None  # one row per token, if requested


@dataclass(frozen=True)
class PromptLogprobsEvent:
    """Prompt tokens from the second on, in order, with their logprobs and top alternatives."""
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


@dataclass(frozen=True)
class EmbeddingEvent:
    """An embedding request's result: the L2-normalised pooled final hidden state."""
    values: list[float]


@dataclass(frozen=True)
class AdmittedEvent:
    """The engine took the request into its waiting queue (it may say so again after an
    engine restart resubmitted the request)."""


ADMITTED = AdmittedEvent()


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: str          # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0      # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class ErrorEvent:
    status: int                 # the HTTP status the app answers with
    message: str                # safe to show the client


# The one place an engine's ErrorKind becomes an HTTP status (503s carry Retry-After).
HTTP_STATUS = {ErrorKind.BAD_REQUEST: 400, ErrorKind.OVERLOADED: 503, ErrorKind.OUT_OF_MEMORY: 503,
               ErrorKind.SHUTTING_DOWN: 503, ErrorKind.INTERNAL: 500}


def error_event(kind, message):
    return ErrorEvent(HTTP_STATUS[kind], message)


Event = AdmittedEvent | PromptLogprobsEvent | EmbeddingEvent | TokenEvent | FinishEvent | ErrorEvent
FINAL_EVENTS = (FinishEvent, ErrorEvent)


class QueueFullError(Exception):
    """The engine's waiting queue (or the ring to it) is full: answer 503 + Retry-After."""

    def __init__(self, message="the server is at capacity; retry later", retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClient(Protocol):
    facts: EngineFacts          # the engine's limits (pyforge/engine/config.py)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "RequestStream":
        """Queue one generation. Raises QueueFullError, or ValueError (a bad prompt: 400)."""

    def ready(self) -> bool:
        """True while the engine accepts work (false while loading or draining)."""

    def stats(self) -> dict:
        """queue_size, running, kv_usage (0..1), prefix_queries, prefix_hits."""


class _TokenRun:
    """Tokens put on a stream since its reader last took them. The run's
    marker waits in the sink in event order; whatever joined the run by the
    time the reader reaches it is read as one TokenEvent."""

    __slots__ = ("token_ids", "logprobs", "top_logprobs")

    def __init__(self):
        self.token_ids, self.logprobs, self.top_logprobs = [], [], []

    def add(self, token_ids, logprobs, top_logprobs):
        self.token_ids += token_ids
        # one request's events carry logprobs in all of them or in none
        if self.logprobs is not None:
            self.logprobs = None if logprobs is None else self.logprobs + logprobs
        if self.top_logprobs is not None:
            self.top_logprobs = None if top_logprobs is None else self.top_logprobs + top_logprobs

    def event(self):
        return TokenEvent(self.token_ids, self.logprobs, self.top_logprobs)


class RequestStream:
    """One submitted prompt's events, in order. The transport calls `put`
    (or `put_tokens`); one HTTP worker thread reads (iterate it, or read it
    through a StreamGroup)."""

    def __init__(self, request_id: int, on_abort: Callable[[int], None], timeout: float = DEFAULT_STALL_TIMEOUT):
        self.request_id = request_id
        self.timeout = timeout
        self._on_abort = on_abort
        self._lock = threading.Lock()       # put() vs. _share() and _take(): nothing lost or reordered
        self._sink = queue.SimpleQueue()    # (stream, event or _TokenRun); shared when grouped
        self._tag = 0
        self._run = None                    # the _TokenRun still open to more tokens
        self.done = False                   # the reader saw the final event
        self.aborted = False

    def put(self, event: Event) -> None:
        if type(event) is TokenEvent:
            self.put_tokens(event.token_ids, event.logprobs, event.top_logprobs)
            return
        with self._lock:
            self._run = None
            self._sink.put((self._tag, event))

    def put_tokens(self, token_ids, logprobs=None, top_logprobs=None) -> None:
        """put(TokenEvent(token_ids, logprobs, top_logprobs)) without making the event:
        the tokens join the run the reader has not taken yet, or start one."""
        with self._lock:
            run = self._run
            if run is None:
                run = self._run = _TokenRun()
                self._sink.put((self._tag, run))
            run.add(token_ids, logprobs, top_logprobs)

    def _take(self, run):
        """The reader's side: close `run` to more tokens, as one TokenEvent."""
        with self._lock:
            if self._run is run:
                self._run = None
        return run.event()

    def abort(self) -> None:
        """Stop generating (idempotent; a no-op once the final event was read)."""
        if not (self.done or self.aborted):
            self.aborted = True
            self._on_abort(self.request_id)

    def __iter__(self) -> Iterator[Event]:
        for _, event in StreamGroup([self]).events():
            yield event

    def _share(self, sink, tag):
        """Route this stream's events, pending ones first, into `sink` as (tag, event)."""
        with self._lock:
            while True:
                try:
                    _, event = self._sink.get_nowait()
                except queue.Empty:
                    break
                sink.put((tag, event))
            self._sink, self._tag = sink, tag


class StreamGroup:
    """Several RequestStreams read as one, in arrival order: yields (index, event)."""

    def __init__(self, streams: list[RequestStream], heartbeat: float | None = None):
        self.streams = list(streams)
        self.heartbeat = heartbeat      # read at every wait: a reader may change it between events
        self._events = queue.SimpleQueue()
        for i, stream in enumerate(self.streams):
            stream._share(self._events, i)

    def events(self) -> Iterator[tuple[int, Event] | None]:
        """Events until every stream finished; None after each `self.heartbeat` seconds
        of silence (SSE keep-alives). A stream silent past its timeout gets an
        ErrorEvent(503); aborted streams are waited on for ABORT_GRACE at most."""
        live = {i for i, s in enumerate(self.streams) if not s.done}
        last = time.monotonic()
        while live:
            item = self._next(live, last, self.heartbeat)
            if item is None:
                yield None
                continue
            i, event = item
            last = time.monotonic()
            if i not in live:
                continue          # late events of a stream already given up
            if type(event) is _TokenRun:
                event = self.streams[i]._take(event)
            elif isinstance(event, FINAL_EVENTS):
                self.streams[i].done = True
                live.discard(i)
            yield i, event

    def _next(self, live, last, heartbeat):
        """The next (index, event); a synthetic ErrorEvent/FinishEvent on timeout; None for a heartbeat."""
        while True:
            deadline = self._deadline(live, last)
            wait = deadline - time.monotonic()
            if heartbeat is not None:
                wait = min(wait, heartbeat)
            try:
                return self._events.get(timeout=max(wait, 0.0))
            except queue.Empty:
                pass
            if time.monotonic() < deadline:
                return None       # heartbeat
            return self._give_up(live)

    def _deadline(self, live, last):
        if all(self.streams[i].aborted for i in live):
            return last + ABORT_GRACE
        return last + min(self.streams[i].timeout for i in live)

    def _give_up(self, live):
        i = min(live)
        stream = self.streams[i]
        if stream.aborted:
            return i, FinishEvent("abort", 0, 0, 0)
        stream.abort()
        return i, ErrorEvent(503, f"the engine did not answer within {stream.timeout:g} s")
