"""`InProcessEngineClient`: an `Engine` stepped by a background thread of this process.

The thread runs the loop the engine process runs (see DESIGN.md, "Engine step"):
admit submitted requests and apply aborts, step while there is work, otherwise
sleep on a condition until a request or an abort arrives (no busy spin). Each
StepOutput becomes an event on its request's stream. For tests, notebooks and
scripts that want the HTTP app without the shared-memory transport.

Only the loop thread touches the Engine; other threads hand it work through
the two deques under `_cond`.
"""
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass

from pyforge.engine.engine import INTERNAL_ERROR, StepError
from pyforge.server.engine_client import (
    ADMITTED, DEFAULT_STALL_TIMEOUT, ErrorEvent, FinishEvent, QueueFullError, RequestStream, TokenEvent,
)

log = logging.getLogger(__name__)


@dataclass
class _Request:
    stream: RequestStream
    prompt_ids: list
    params: object
    seq: object = None          # the engine's Sequence once admitted


class InProcessEngineClient:
    def __init__(self, engine, queue_capacity=256, timeout=DEFAULT_STALL_TIMEOUT):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.queue_capacity = queue_capacity
        self.timeout = timeout
        self._cond = threading.Condition()
        self._submits = deque()     # _Request, not yet given to the engine
        self._aborts = deque()      # request ids
        self._n_waiting = 0         # requests admitted but not yet scheduled
        self._closed = False
        self._ids = itertools.count(1)
        self._requests = {}         # request id -> _Request (loop thread only)
        self._by_seq = {}           # seq id -> request id (loop thread only)
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
        self._fail_all(503, "the engine is shutting down")

    def _admit(self, submits):
        for req in submits:
            try:
                req.seq = self.engine.add_request(req.prompt_ids, req.params)
            except ValueError as e:
                req.stream.put(ErrorEvent(400, str(e)))
                continue
            self._requests[req.stream.request_id] = req
            self._by_seq[req.seq.seq_id] = req.stream.request_id
            req.stream.put(ADMITTED)

    def _apply_aborts(self, aborts):
        for request_id in aborts:
            req = self._requests.get(request_id)
            if req is not None:
                self.engine.abort(req.seq.seq_id)
                self._finish(req, "abort")

    def _step(self):
        try:
            outputs = self.engine.step() if self.engine.has_work else []
        except StepError as e:      # the step's requests fail; the rest carry on
            log.error("engine step failed: %s", e, exc_info=e.__cause__)
            self._fail_sequences(e.seq_ids, *e.reply())
            outputs = e.outputs
        except Exception:
            # our bug: fail what is in flight rather than leave readers waiting
            log.exception("engine step failed")
            self._fail_all(500, INTERNAL_ERROR)
            outputs = []
        for out in outputs:
            self._publish(out)
        with self._cond:
            self._n_waiting = len(self.engine.scheduler.waiting)
            self._stats = self._snapshot()

    def _publish(self, out):
        request_id = self._by_seq.get(out.seq_id)
        if request_id is None:
            return
        req = self._requests[request_id]
        want = req.params.logprobs is not None
        req.stream.put(TokenEvent(
            [out.token_id],
            [out.logprob] if want else None,
            [list(out.top_logprobs)] if want else None,
        ))
        if out.finished:
            self._finish(req, out.finish_reason)

    def _finish(self, req, reason):
        seq = req.seq
        del self._requests[req.stream.request_id]
        del self._by_seq[seq.seq_id]
        req.stream.put(FinishEvent(reason, seq.num_prompt_tokens, seq.num_output_tokens,
                                   seq.num_cached_prompt_tokens))

    def _fail_sequences(self, seq_ids, status, message):
        """ErrorEvents for the requests of these (already aborted) sequences."""
        for request_id in [self._by_seq.pop(s) for s in seq_ids if s in self._by_seq]:
            self._requests.pop(request_id).stream.put(ErrorEvent(status, message))

    def _fail_all(self, status, message):
        for req in list(self._requests.values()):
            self.engine.abort(req.seq.seq_id)
            del self._requests[req.stream.request_id]
            del self._by_seq[req.seq.seq_id]
            req.stream.put(ErrorEvent(status, message))
        with self._cond:
            pending, self._submits = self._submits, deque()
        for req in pending:
            req.stream.put(ErrorEvent(status, message))

    def _snapshot(self):
        engine, blocks = self.engine, self.engine.block_manager
        return {
            "queue_size": len(engine.scheduler.waiting),
            "running": len(engine.scheduler.running),
            "kv_usage": blocks.usage,
            "prefix_queries": blocks.prefix_queries,
            "prefix_hits": blocks.prefix_hits,
        }
