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

`ready()` is false while the engine is not READY, and once its heartbeat has not
moved for `heartbeat_timeout` seconds (a wedged engine: alive, not stepping).
When the engine process dies, `ready()` turns false within ALIVE_TRUST seconds
(a live engine is looked up in /proc at most that often: once per request
costs more than the rest of submit). Within one poll interval the dispatcher
ends every stream that had tokens with ErrorEvent(503); those still queued
(no token yet: their client has seen nothing) wait for the engine the
launcher restarts, up to RESTART_WAIT seconds, and are then submitted to it
again under new ids (an ABORT of the old id first, in case a copy of the old
SUBMIT was still in the ring).
"""
import logging
import threading
import time

from pyforge.engine.sequence import check_prompt_ids
from pyforge.ipc import (Abort, Admitted, Embedding, EngineStatus, Error, Finish, PromptLogprobs, Submit, Tokens,
                         decode_batch, encode, process_alive)
from pyforge.server.engine_client import (
    ADMITTED, DEFAULT_STALL_TIMEOUT, EmbeddingEvent, ErrorEvent, FinishEvent, PromptLogprobsEvent, QueueFullError,
    RequestStream, TokenEvent, error_event,
)

log = logging.getLogger(__name__)

POLL = 0.25              # dispatcher wake-up interval for the engine liveness check
PUT_TIMEOUT = 1.0        # seconds to wait for room in the request ring before answering 503
ALIVE_TRUST = 0.05       # seconds a check that found the engine process alive stays believed
RESTART_WAIT = 120.0     # seconds queued requests wait for a restarted engine
HEARTBEAT_TIMEOUT = 30.0  # seconds without an engine heartbeat before ready() is false


class IpcEngineClient:
    def __init__(self, segment, queue_capacity=None, timeout=DEFAULT_STALL_TIMEOUT,
                 heartbeat_timeout=HEARTBEAT_TIMEOUT):
        self.seg = segment
        self.facts = segment.facts      # what the engine decided: the workers do not recompute it
        self.queue_capacity = queue_capacity
        self.timeout = timeout
        self.heartbeat_timeout = heartbeat_timeout
        self._beat = (segment.heartbeat, time.monotonic())     # the last heartbeat seen, and when
        self.slot = segment.claim_slot()
        self._ids = segment.request_ids()
        self._lock = threading.Lock()
        self._streams = {}           # request id -> RequestStream awaiting its final record
        self._queued = {}            # request id -> its Submit, until the first token: resubmittable
        self._held = []              # (stream, Submit) waiting for a restarted engine, and since when
        self._held_since = None
        self._closed = threading.Event()
        self._engine_lost = False    # the response ring broke: this client is done
        self._lost_pid = None        # the engine process we saw die
        self._engine_pid = None      # the engine process our requests went to
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
            submit = Submit(request_id, self.slot, prompt_ids, params)
            self._streams[request_id] = stream     # before the put: no reply can be missed
            self._queued[request_id] = submit
        if not self.seg.request_ring.put(encode(submit), timeout=PUT_TIMEOUT):
            with self._lock:
                self._streams.pop(request_id, None)
                self._queued.pop(request_id, None)
            raise QueueFullError("the engine's request ring is full; retry later")
        return stream

    def check_prompt(self, prompt_ids):
        check_prompt_ids(prompt_ids, self.facts.max_model_len, self.facts.vocab_size)

    def ready(self):
        return (not self._engine_lost and self.seg.engine_status == EngineStatus.READY
                and self._engine_process_alive() and self._engine_beating() and self._thread.is_alive())

    def _engine_beating(self):
        """The engine stepped (or idled) within heartbeat_timeout: alive is not enough,
        a wedged engine is alive too."""
        beat, now = self.seg.heartbeat, time.monotonic()
        if beat != self._beat[0]:
            self._beat = (beat, now)
            return True
        return now - self._beat[1] < self.heartbeat_timeout

    def _engine_process_alive(self):
        now = time.monotonic()
        if now - self._alive_at < ALIVE_TRUST:
            return True
        pid = self.seg.engine_pid
        alive = pid != self._lost_pid and process_alive(pid)
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
            self._held = [(st, sub) for st, sub in self._held if st.request_id != request_id]
            pending = request_id in self._streams
        if pending and not self.seg.request_ring.put(encode(Abort(request_id)), timeout=PUT_TIMEOUT):
            log.error("could not send ABORT for request %#x: the request ring stays full", request_id)

    # -- the dispatcher thread ---------------------------------------------------
    def _dispatch(self):
        next_watch = 0.0
        while not self._closed.is_set():
            try:
                message = self._ring.get(timeout=POLL)
            except Exception:
                log.exception("the response ring is unreadable")
                self._engine_lost = True
                break
            if message is not None:
                self._route(message)
            now = time.monotonic()
            if now >= next_watch:       # however busy the ring: a restart must not go unseen
                next_watch = now + POLL
                self._watch_engine()
                if self._held:
                    self._resubmit_held()
        self._fail_all("the engine stopped")

    def _watch_engine(self):
        """Notice the engine process we talk to dying, or being replaced already (a
        fast restart can come and go between two looks)."""
        pid = self.seg.engine_pid
        if self._engine_pid and pid != self._engine_pid:
            self._lose_engine(self._engine_pid)
        elif pid and pid != self._lost_pid and not process_alive(pid):
            self._lose_engine(pid)
        if pid and pid != self._lost_pid:
            self._engine_pid = pid

    def _route(self, message):
        """Hand each record of a response message (a batch) to its stream."""
        try:
            records = decode_batch(message)
        except ValueError as e:
            log.error("dropping a malformed response message: %s", e)
            return
        streams, queued, final = self._streams, self._queued, (Finish, Error)
        with self._lock:       # a final record is the stream's last: forget it
            routed = []
            for r in records:
                if type(r) is not Admitted:     # the request started (or ended): no resubmitting it
                    queued.pop(r.request_id, None)
                routed.append((streams.pop(r.request_id, None) if isinstance(r, final) else
                               streams.get(r.request_id), r))
        for stream, record in routed:
            if stream is None:
                continue
            if type(record) is Tokens:
                stream.put_tokens(record.token_ids, record.logprobs, record.top_logprobs)
            else:
                stream.put(_event(record))

    def _lose_engine(self, pid):
        """The engine process died: fail what had started, hold what was queued."""
        while (message := self._ring.get_all(1)):     # what it said before dying still counts
            self._route(message[0])
        log.error("the engine process (pid %d) is gone; %d queued request(s) wait for its restart",
                  pid, len(self._queued))
        self._lost_pid, self._engine_pid = pid, None
        self._alive_at = -ALIVE_TRUST    # a check that found it alive no longer counts
        with self._lock:
            held = [(self._streams.pop(i), sub) for i, sub in self._queued.items() if i in self._streams]
            self._queued = {}
            self._held += held
            self._held_since = self._held_since or time.monotonic()
        self._fail_all("the engine process stopped while generating this request; retry", held_too=False)

    def _resubmit_held(self):
        """Hand the held requests to the restarted engine, or give them up after RESTART_WAIT."""
        ready = self.ready()
        if not ready and time.monotonic() - self._held_since <= RESTART_WAIT:
            return
        with self._lock:
            held, self._held, self._held_since = self._held, [], None
        for stream, old in held:
            if not ready:
                stream.put(ErrorEvent(503, "the engine did not come back in time; retry later"))
                continue
            with self._lock:
                submit = Submit(next(self._ids), self.slot, old.prompt_ids, old.params)
                stream.request_id = submit.request_id
                self._streams[submit.request_id] = stream
                self._queued[submit.request_id] = submit
            ok = (self.seg.request_ring.put(encode(Abort(old.request_id)), timeout=PUT_TIMEOUT)
                  and self.seg.request_ring.put(encode(submit), timeout=PUT_TIMEOUT))
            if not ok:
                with self._lock:
                    self._streams.pop(submit.request_id, None)
                    self._queued.pop(submit.request_id, None)
                stream.put(ErrorEvent(503, "the engine's request ring is full; retry later"))
        if ready:
            log.info("resubmitted %d queued request(s) to the restarted engine", len(held))

    def _fail_all(self, message, held_too=True):
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._queued = {}
            if held_too:
                streams += [stream for stream, _ in self._held]
                self._held, self._held_since = [], None
        for stream in streams:
            stream.put(ErrorEvent(503, message))


def _event(record):
    if isinstance(record, Admitted):
        return ADMITTED
    if isinstance(record, PromptLogprobs):      # before Tokens: it shares (subclasses) that layout
        return PromptLogprobsEvent(record.token_ids, record.logprobs, record.top_logprobs)
    if isinstance(record, Embedding):
        return EmbeddingEvent(record.values)
    if isinstance(record, Tokens):
        return TokenEvent(record.token_ids, record.logprobs, record.top_logprobs)
    if isinstance(record, Finish):
        return FinishEvent(record.finish_reason, record.prompt_tokens, record.completion_tokens, record.cached_tokens)
    if isinstance(record, Error):
        return error_event(record.kind, record.message)
    raise ValueError(f"unexpected {type(record).__name__} record on a response ring")
