"""`IpcEngineClient`: the HTTP worker's side of the shared-memory transport.

One per worker process. It claims a worker slot in the segment; `submit`
writes a SUBMIT record to the request ring and returns a `RequestStream`; one
dispatcher thread reads the slot's response ring and puts each record, as an
event, on its request's stream (records.py: TOKENS*, then FINISH or ERROR).

Checks done here, before anything crosses to the engine, so the app can answer
at once: a prompt the engine would reject (empty, too long, ids outside the
vocabulary) raises ValueError; an engine that is not ready, a waiting queue at
capacity (as of the engine's last step) or a full request ring raise
QueueFullError. The engine still checks everything itself and answers ERROR.

When the engine process dies, `ready()` turns false within ALIVE_TRUST seconds
(a live engine is looked up in /proc at most that often: once per request
costs more than the rest of submit) and the dispatcher ends every pending
stream with ErrorEvent(503) within one poll interval.
"""
import dataclasses
import logging
import threading
import time

from pyforge.engine.sequence import check_prompt_ids
from pyforge.ipc import Abort, EngineStatus, Error, Finish, Submit, Tokens, decode_batch, encode
from pyforge.server.engine_client import (
    DEFAULT_STALL_TIMEOUT, ErrorEvent, FinishEvent, QueueFullError, RequestStream, TokenEvent,
)
from pyforge.server.engine_process import _alive

log = logging.getLogger(__name__)

POLL = 0.25              # dispatcher wake-up interval for the engine liveness check
PUT_TIMEOUT = 1.0        # seconds to wait for room in the request ring before answering 503
ALIVE_TRUST = 0.05       # seconds a check that found the engine process alive stays believed


class IpcEngineClient:
    def __init__(self, segment, max_model_len, vocab_size=None, queue_capacity=None,
                 timeout=DEFAULT_STALL_TIMEOUT):
        self.seg = segment
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.queue_capacity = queue_capacity
        self.timeout = timeout
        self.slot = segment.claim_slot()
        self._ids = segment.request_ids()
        self._lock = threading.Lock()
        self._streams = {}           # request id -> RequestStream awaiting its final record
        self._closed = threading.Event()
        self._engine_lost = False
        self._alive_at = -ALIVE_TRUST   # when the engine process was last seen alive
        self._ring = segment.response_ring(self.slot)
        self._thread = threading.Thread(target=self._dispatch, name=f"pyforge-ipc-{self.slot}", daemon=True)
        self._thread.start()

    # -- the EngineClient interface (any thread) -----------------------------
    def submit(self, prompt_ids, params):
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(prompt_ids)
        if not self.ready():
            raise QueueFullError("the engine is not ready")
        if self.queue_capacity is not None and self.seg.get("num_requests_waiting") >= self.queue_capacity:
            raise QueueFullError()
        with self._lock:
            request_id = next(self._ids)
            stream = RequestStream(request_id, self._abort, self.timeout)
            self._streams[request_id] = stream     # before the put: no reply can be missed
        record = encode(Submit(request_id, self.slot, prompt_ids, _params_dict(params)))
        if not self.seg.request_ring.put(record, timeout=PUT_TIMEOUT):
            with self._lock:
                self._streams.pop(request_id, None)
            raise QueueFullError("the engine's request ring is full; retry later")
        return stream

    def check_prompt(self, prompt_ids):
        check_prompt_ids(prompt_ids, self.max_model_len, self.vocab_size)

    def ready(self):
        return (not self._engine_lost and self.seg.engine_status == EngineStatus.READY
                and self._engine_process_alive() and self._thread.is_alive())

    def engine_alive(self):
        """The engine process exists (loading, ready or draining)."""
        return (not self._engine_lost and self.seg.engine_status != EngineStatus.STOPPED
                and self._engine_process_alive())

    def _engine_process_alive(self):
        now = time.monotonic()
        if now - self._alive_at < ALIVE_TRUST:
            return True
        alive = _alive(self.seg.engine_pid)
        if alive:
            self._alive_at = now
        return alive

    def stats(self):
        s = self.seg.stats()
        return {"queue_size": s["num_requests_waiting"], "running": s["num_requests_running"],
                "kv_usage": s["kv_cache_usage_perc"], "prefix_queries": s["prefix_cache_queries"],
                "prefix_hits": s["prefix_cache_hits"]}

    def close(self):
        """Stop the dispatcher, end pending streams with 503, give the slot back."""
        self._closed.set()
        self._thread.join()
        self._fail_all("the server is shutting down")
        self.seg.release_slot()

    def _abort(self, request_id):
        with self._lock:
            pending = request_id in self._streams
        if pending and not self.seg.request_ring.put(encode(Abort(request_id)), timeout=PUT_TIMEOUT):
            log.error("could not send ABORT for request %#x: the request ring stays full", request_id)

    # -- the dispatcher thread ---------------------------------------------------
    def _dispatch(self):
        while not self._closed.is_set():
            try:
                message = self._ring.get(timeout=POLL)
            except Exception:
                log.exception("the response ring is unreadable")
                self._engine_lost = True
                break
            if message is not None:
                self._route(message)
                continue
            pid = self.seg.engine_pid
            if pid and not _alive(pid):
                self._lose_engine()
        self._fail_all("the engine stopped")

    def _route(self, message):
        """Hand each record of a response message (a batch) to its stream."""
        try:
            records = decode_batch(message)
        except ValueError as e:
            log.error("dropping a malformed response message: %s", e)
            return
        streams, final = self._streams, (Finish, Error)
        with self._lock:       # a final record is the stream's last: forget it
            routed = [(streams.pop(r.request_id, None) if isinstance(r, final) else streams.get(r.request_id), r)
                      for r in records]
        for stream, record in routed:
            if stream is None:
                continue
            if type(record) is Tokens:
                stream.put_tokens(record.token_ids, record.logprobs, record.top_logprobs)
            else:
                stream.put(_event(record))

    def _lose_engine(self):
        while (message := self._ring.get_all(1)):     # what it said before dying still counts
            self._route(message[0])
        if not self._engine_lost:
            log.error("the engine process (pid %d) is gone", self.seg.engine_pid)
        self._engine_lost = True
        self._fail_all("the engine process stopped")

    def _fail_all(self, message):
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(ErrorEvent(503, message))


def _params_dict(params):
    # the fields are flat: no need for asdict()'s recursive deep copy
    d = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    d["stop_token_ids"] = list(d["stop_token_ids"])
    return d


def _event(record):
    if isinstance(record, Tokens):
        return TokenEvent(record.token_ids, record.logprobs, record.top_logprobs)
    if isinstance(record, Finish):
        return FinishEvent(record.finish_reason, record.prompt_tokens, record.completion_tokens, record.cached_tokens)
    if isinstance(record, Error):
        return ErrorEvent(record.status, record.message)
    raise ValueError(f"unexpected {type(record).__name__} record on a response ring")
