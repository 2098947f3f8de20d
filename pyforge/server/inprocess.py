"""`InProcessEngineClient`: an `Engine` stepped by a background thread of this process.

The thread runs the loop the engine process runs (see DESIGN.md, "Engine step"):
admit submitted requests and apply aborts, step while there is work, otherwise
sleep on a condition until a request or an abort arrives (no busy spin). The
bookkeeping is the request table the engine process uses too
(pyforge/engine/requests.py); StreamReplies turns its replies into events on
each request's stream. For tests, notebooks and scripts that want the HTTP app
without the shared-memory transport.

Only the loop thread touches the Engine; other threads hand it work through
the two deques under `_cond`.
"""
import itertools
import threading
from collections import deque
from dataclasses import dataclass

from pyforge.engine.errors import ErrorKind
from pyforge.engine.requests import RequestTable
from pyforge.server.engine_client import (
    ADMITTED, DEFAULT_STALL_TIMEOUT, EmbeddingEvent, FinishEvent, PromptLogprobsEvent, QueueFullError, RequestStream,
    TokenEvent, error_event,
)


@dataclass
class _Request:
    stream: RequestStream
    prompt_ids: list
    params: object


class StreamReplies:
    """The request table's replies as events on each request's RequestStream (its owner)."""

    @staticmethod
    def admitted(entry):
        entry.owner.put(ADMITTED)

    @staticmethod
    def prompt_logprobs(entry, entries):
        entry.owner.put(PromptLogprobsEvent([e.token_id for e in entries], [e.logprob for e in entries],
                                            [list(e.top) for e in entries]))

    @staticmethod
    def embedding(entry, vector):
        entry.owner.put(EmbeddingEvent(vector.tolist()))

    @staticmethod
    def tokens(entry, out):
        want = entry.want_logprobs
        entry.owner.put(TokenEvent([out.token_id], [out.logprob] if want else None,
                                   [list(out.top_logprobs)] if want else None))

    @staticmethod
    def finished(entry, reason):
        seq = entry.seq
        entry.owner.put(FinishEvent(reason, seq.num_prompt_tokens, seq.num_output_tokens,
                                    seq.num_cached_prompt_tokens))

    @staticmethod
    def failed(entry, kind, message):
        entry.owner.put(error_event(kind, message))


class InProcessEngineClient:
    def __init__(self, engine, queue_capacity=256, timeout=DEFAULT_STALL_TIMEOUT):
        self.engine = engine
        self.facts = engine.facts
        self.queue_capacity = queue_capacity
        self.timeout = timeout
        self._cond = threading.Condition()
        self._submits = deque()     # _Request, not yet given to the engine
        self._aborts = deque()      # request ids
        self._n_waiting = 0         # requests admitted but not yet scheduled
        self._closed = False
        self._ids = itertools.count(1)
        self._table = RequestTable(engine, StreamReplies())    # the loop thread's alone
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="pyforge-engine", daemon=True)
        self._thread.start()

    # -- the EngineClient interface (any thread) ---------------------------
    def submit(self, prompt_ids, params):
        prompt_ids = list(prompt_ids)
        self.engine.check_prompt(prompt_ids)     # ValueError now rather than an ErrorEvent later
        with self._cond:
            if self._closed:
                raise QueueFullError("the engine is shutting down")
            if len(self._submits) + self._n_waiting >= self.queue_capacity:
                raise QueueFullError()
            stream = RequestStream(next(self._ids), self._abort, self.timeout)
            self._submits.append(_Request(stream, prompt_ids, params))
            self._cond.notify()
        return stream

    def ready(self):
        return self._thread.is_alive() and not self._closed

    def stats(self):
        with self._cond:
            return dict(self._stats)

    def close(self):
        """Stop the loop thread; requests still in flight get an ErrorEvent(503)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _abort(self, request_id):
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # -- the loop (engine thread) ------------------------------------------
    def _run(self):
        while True:
            with self._cond:
                while not (self._submits or self._aborts or self._closed or self.engine.has_work):
                    self._cond.wait()
                if self._closed:
                    break
                submits, self._submits = self._submits, deque()
                aborts, self._aborts = self._aborts, deque()
                self._n_waiting += len(submits)    # keep the queue count whole while we admit
            self._admit(submits)
            self._apply_aborts(aborts)
            self._step()
        self._fail_all(ErrorKind.SHUTTING_DOWN, "the engine is shutting down")

    def _admit(self, submits):
        for req in submits:
            self._table.admit(req.stream.request_id, req.stream, req.prompt_ids, req.params)

    def _apply_aborts(self, aborts):
        for request_id in aborts:
            self._table.abort(request_id)

    def _step(self):
        if self.engine.has_work:
            self._table.step()
        with self._cond:
            self._n_waiting = len(self.engine.scheduler.waiting)
            self._stats = self._snapshot()

    def _fail_all(self, kind, message):
        self._table.fail_all(kind, message)
        with self._cond:
            pending, self._submits = self._submits, deque()
        for req in pending:
            req.stream.put(error_event(kind, message))

    def _snapshot(self):
        engine, blocks = self.engine, self.engine.block_manager
        return {
            "queue_size": len(engine.scheduler.waiting),
            "running": len(engine.scheduler.running),
            "kv_usage": blocks.usage,
            "prefix_queries": blocks.prefix_queries,
            "prefix_hits": blocks.prefix_hits,
        }
