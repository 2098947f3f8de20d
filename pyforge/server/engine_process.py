"""The engine process: one `Engine` behind the shared-memory segment.

    run_engine(segment_name, engine_kwargs, queue_capacity, drain_timeout)

The loop (DESIGN.md, "Engine step"; ring traffic in pyforge/ipc/records.py):

  1. With nothing to run, sleep in request_ring.wait_readable(IDLE_WAIT): no
     busy spin; the timeout only keeps the heartbeat and the checks below going.
  2. Drain the request ring with get_all(): SUBMIT -> Engine.add_request (a bad
     prompt or bad params: ERROR 400; the waiting queue at `queue_capacity`, or
     draining: ERROR 503), ABORT -> Engine.abort + FINISH "abort".
  3. step(); each StepOutput becomes a TOKENS record (and a FINISH when the
     sequence ends) for the worker slot that submitted it; each slot gets its
     step's records as one batch message (one ring write, one wake-up).
  4. Stats (waiting, running, KV usage, prefix-cache counters, token totals)
     and the heartbeat.

Requests of a worker slot whose process died (or that stops reading its ring)
are aborted. SIGTERM: status DRAINING, new SUBMITs get 503, what is admitted
runs to the end for up to `drain_timeout` seconds (the rest get ERROR 503),
then status STOPPED and exit. The engine also stops when its parent (the
launcher) dies, so a killed launcher leaves no orphan behind.
"""
import logging
import os
import signal
import time
from dataclasses import dataclass

from pyforge.engine.engine import INTERNAL_ERROR, StepError
from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc import (Abort, Admitted, EngineStatus, Error, Finish, Segment, Submit, Tokens, decode, encode,
                         encode_token, process_alive)

log = logging.getLogger(__name__)

IDLE_WAIT = 0.1          # seconds asleep on an empty request ring between heartbeats
PUT_TIMEOUT = 1.0        # a worker that does not drain its ring this long loses its requests
CHECK_EVERY = 0.25       # seconds between checks of worker slots and of the parent


@dataclass
class _Request:
    request_id: int
    worker: int
    seq: object
    want_logprobs: bool
    worker_pid: int             # the slot's owner at submission: a replacement worker does not adopt these
    counted_prompt: bool = False


class EngineLoop:
    """Owns the Engine and the bookkeeping request id <-> sequence <-> worker slot."""

    def __init__(self, segment, engine, queue_capacity=256):
        self.seg = segment
        self.engine = engine
        engine.sampler.all_logprobs = False    # logprobs go only to requests that ask: skip the others'
        self.queue_capacity = queue_capacity
        self.requests = {}          # request id -> _Request
        self.by_seq = {}            # seq id -> request id
        self.draining = False
        self._admitted = {}         # worker slot -> requests admitted since the last send
        self._prefix = (0, 0)       # block manager counters already added to the stats
        self._preemptions = 0       # scheduler counter already added to the stats
        self._next_check = 0.0

    # -- the loop ---------------------------------------------------------------
    def run(self, stop_requested, drain_timeout=30.0, parent_pid=None):
        """Serve until stop_requested() turns true, then drain and return."""
        deadline = None
        while True:
            if deadline is None and stop_requested():
                self.draining = True
                self.seg.engine_status = EngineStatus.DRAINING
                deadline = time.monotonic() + drain_timeout
                log.info("draining %d requests (up to %g s)", len(self.requests), drain_timeout)
            if deadline is not None and (not self.engine.has_work or time.monotonic() >= deadline):
                break
            self.run_once()
            if parent_pid is not None and os.getppid() != parent_pid and deadline is None:
                log.error("the launcher (pid %d) is gone; stopping", parent_pid)
                stop_requested = _always
        self.drain_ring()
        self.send_batches(self._take_admitted())
        self.fail_all(503, "the engine is shutting down")

    def run_once(self):
        if not self.engine.has_work:
            self.seg.request_ring.wait_readable(IDLE_WAIT)
        self.drain_ring()
        if self.engine.has_work:
            self.step()
        self.send_batches(self._take_admitted())     # what no step carried (the step failed)
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self.abort_orphans()
        self.publish_stats()
        self.seg.beat()

    def drain_ring(self):
        for message in self.seg.request_ring.get_all():
            try:
                record = decode(message)
            except ValueError as e:
                log.error("dropping a malformed request record: %s", e)
                continue
            if isinstance(record, Submit):
                self.submit(record)
            elif isinstance(record, Abort):
                self.abort(record.request_id)
            else:
                log.error("unexpected %s record on the request ring", type(record).__name__)

    # -- requests ---------------------------------------------------------------
    def submit(self, rec):
        if rec.request_id in self.requests:
            return self.reply(rec.worker, Error(rec.request_id, 400, "duplicate request id"))
        if self.draining:
            return self.reply(rec.worker, Error(rec.request_id, 503, "the engine is shutting down"))
        if len(self.engine.scheduler.waiting) >= self.queue_capacity:
            return self.reply(rec.worker, Error(rec.request_id, 503, "the server is at capacity; retry later"))
        try:
            worker_pid = self.seg.slot_pid(rec.worker)
            params = SamplingParams(**rec.params)
            seq = self.engine.add_request(rec.prompt_ids, params)
        except (TypeError, ValueError) as e:
            return self.reply(rec.worker, Error(rec.request_id, 400, str(e)))
        self.requests[rec.request_id] = _Request(rec.request_id, rec.worker, seq, params.logprobs is not None,
                                                 worker_pid)
        self.by_seq[seq.seq_id] = rec.request_id
        # sent with this step's tokens for that worker: one ring write, not one per request
        self._admitted.setdefault(rec.worker, []).append(self.requests[rec.request_id])

    def abort(self, request_id):
        req = self.requests.get(request_id)
        if req is not None:
            self.engine.abort(req.seq.seq_id)
            self.finish(req, "abort")

    def step(self):
        try:
            outputs = self.engine.step()
        except StepError as e:      # the step's requests fail; the rest carry on
            log.error("engine step failed: %s", e, exc_info=e.__cause__)
            self.fail_sequences(e.seq_ids, *e.reply())
            outputs = e.outputs
        except Exception:
            log.exception("engine step failed")
            self.fail_all(500, INTERNAL_ERROR)
            return
        self.seg.add("generation_tokens", len(outputs))
        # worker slot -> (encoded records, their requests); admissions first, in ring order
        batches, prompt_tokens = self._take_admitted(), 0
        for out in outputs:
            request_id = self.by_seq.get(out.seq_id)
            if request_id is None:
                continue
            req = self.requests[request_id]
            if not req.counted_prompt:
                req.counted_prompt = True
                prompt_tokens += req.seq.num_prompt_tokens
            records, reqs = batches.setdefault(req.worker, ([], []))
            reqs.append(req)
            if req.want_logprobs:
                records.append(encode(Tokens(request_id, [out.token_id], [out.logprob], [list(out.top_logprobs)])))
            else:
                records.append(encode_token(request_id, out.token_id))
            if out.finished:
                self.forget(req)
                records.append(encode(self._finish_record(req, out.finish_reason)))
        if prompt_tokens:
            self.seg.add("prompt_tokens", prompt_tokens)
        self.send_batches(batches)

    def _take_admitted(self):
        admitted, self._admitted = self._admitted, {}
        return {worker: ([encode(Admitted(r.request_id)) for r in reqs], list(reqs))
                for worker, reqs in admitted.items()}

    def send_batches(self, batches):
        for worker, (records, reqs) in batches.items():
            if not self.send(worker, b"".join(records), reqs[0].request_id):
                for req in reqs:                # that worker is gone or stuck: its requests end here
                    self.engine.abort(req.seq.seq_id)
                    self.forget(req)

    def finish(self, req, reason):
        self.forget(req)
        self.reply(req.worker, self._finish_record(req, reason))

    @staticmethod
    def _finish_record(req, reason):
        seq = req.seq
        return Finish(req.request_id, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                      seq.num_cached_prompt_tokens)

    def forget(self, req):
        self.requests.pop(req.request_id, None)
        self.by_seq.pop(req.seq.seq_id, None)

    def fail_sequences(self, seq_ids, status, message):
        """Error replies for the requests of these (already aborted) sequences."""
        for req in [self.requests[self.by_seq[s]] for s in seq_ids if s in self.by_seq]:
            self.forget(req)
            self.reply(req.worker, Error(req.request_id, status, message))

    def fail_all(self, status, message):
        for req in list(self.requests.values()):
            self.engine.abort(req.seq.seq_id)
            self.forget(req)
            self.reply(req.worker, Error(req.request_id, status, message))

    def abort_orphans(self):
        """Abort the requests of worker processes that died or left, even where a
        new worker has already claimed the slot."""
        owners = {}
        for req in list(self.requests.values()):
            if req.worker not in owners:
                pid = self.seg.slot_pid(req.worker)
                owners[req.worker] = pid if process_alive(pid) else None
            if owners[req.worker] != req.worker_pid:
                self.engine.abort(req.seq.seq_id)
                self.forget(req)

    def reply(self, worker, record):
        """Put one record on `worker`'s response ring; False if the worker is gone or stuck."""
        return self.send(worker, encode(record), record.request_id)

    def send(self, worker, message, request_id):
        """Put one message (a batch of records) on `worker`'s response ring;
        False if the worker is gone or stuck."""
        try:
            ring = self.seg.response_ring(worker)
        except ValueError:
            log.error("request from unknown worker slot %d", worker)
            return False
        if ring.put(message, timeout=PUT_TIMEOUT):
            return True
        log.error("worker slot %d does not read its replies; dropping its requests (%#x, ...)", worker, request_id)
        return False

    # -- stats ------------------------------------------------------------------
    def publish_stats(self):
        engine, blocks = self.engine, self.engine.block_manager
        self.seg.set("num_requests_waiting", len(engine.scheduler.waiting))
        self.seg.set("num_requests_running", len(engine.scheduler.running))
        self.seg.set("kv_cache_usage_perc", float(blocks.usage))
        queries, hits = blocks.prefix_queries, blocks.prefix_hits
        if (queries, hits) != self._prefix:
            self.seg.add("prefix_cache_queries", queries - self._prefix[0])
            self.seg.add("prefix_cache_hits", hits - self._prefix[1])
            self._prefix = (queries, hits)
        preemptions = engine.scheduler.num_preemptions
        if preemptions != self._preemptions:
            self.seg.add("num_preemptions", preemptions - self._preemptions)
            self._preemptions = preemptions


def _always():
    return True


def run_engine(segment_name, engine_kwargs, queue_capacity=256, drain_timeout=30.0, log_level="INFO"):
    """The engine process's entry point (a multiprocessing target)."""
    logging.basicConfig(level=getattr(logging, str(log_level).upper(), logging.INFO),
                        format="%(asctime)s %(process)d engine %(levelname)s %(message)s")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group: the launcher decides
    parent = os.getppid()
    seg = Segment.attach(segment_name)
    try:
        seg.engine_pid = os.getpid()
        from pyforge.engine.engine import Engine     # the heavy imports happen in this process only
        try:
            engine = Engine(**engine_kwargs)
        except (ValueError, OSError) as e:
            log.error("could not load the model: %s", e)
            raise SystemExit(2) from None
        loop = EngineLoop(seg, engine, queue_capacity)
        loop.publish_stats()
        seg.engine_status = EngineStatus.READY
        log.info("ready: %s (max_model_len %d)", engine_kwargs.get("model_path"), engine.max_model_len)
        loop.run(lambda: bool(stop), drain_timeout, parent_pid=parent)
        seg.engine_status = EngineStatus.STOPPED     # only an orderly stop says so: a crash leaves it be
    finally:
        seg.close()
    log.info("stopped")


def main(argv=None):
    """python -m pyforge.server.engine_process SEGMENT ENGINE_KWARGS_JSON QUEUE_CAPACITY DRAIN_TIMEOUT [LOG_LEVEL]
    (what the launcher runs)."""
    import json
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (4, 5):
        raise SystemExit(main.__doc__)
    run_engine(argv[0], json.loads(argv[1]), int(argv[2]), float(argv[3]), *argv[4:])


if __name__ == "__main__":
    main()
