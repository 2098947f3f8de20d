"""The engine process: one `Engine` behind the shared-memory segment.

    run_engine(segment_name, engine_config (EngineConfig fields), queue_capacity, drain_timeout)

The loop (DESIGN.md, "Engine step"; ring traffic in pyforge/ipc/records.py):

  1. With nothing to run, sleep in request_ring.wait_readable(IDLE_WAIT): no
     busy spin; the timeout only keeps the heartbeat and the checks below going.
  2. Drain the request ring with get_all(): SUBMIT -> Engine.add_request (a bad
     prompt or bad params: ERROR 400; the waiting queue at `queue_capacity`, or
     draining: ERROR 503), ABORT -> Engine.abort + FINISH "abort".
  3. step(); each output becomes a TOKENS record (and a FINISH when the
     sequence ends) for the worker slot that submitted it; each slot gets its
     step's records as one batch message (one ring write, one wake-up). A plain
     step's records are encoded by the step core itself (step_core.publish_plain),
     byte for byte and in the order this module would write them.
  4. Stats (waiting, running, KV usage, prefix-cache counters, token totals,
     speculative-decoding counters) and the heartbeat.

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
from typing import NamedTuple

from pyforge.engine.errors import ErrorKind
from pyforge.engine.requests import RequestTable
from pyforge.ipc import (Abort, Admitted, Embedding, EngineStatus, Error, Finish, PromptLogprobs, RecordType, Segment,
                         Submit, Tokens, decode, encode, encode_token, peek_header, process_alive)

log = logging.getLogger(__name__)

IDLE_WAIT = 0.1          # seconds asleep on an empty request ring between heartbeats
PUT_TIMEOUT = 0.0        # a worker whose ring is full loses its requests at once: one stuck
                         # worker must not stall the step of every other request
CHECK_EVERY = 0.25       # seconds between checks of worker slots and of the parent


class _Worker(NamedTuple):
    """Who waits for a request: a worker slot, and the process that held it at
    submission (a replacement worker in the same slot does not adopt its requests)."""
    slot: int
    pid: int


class RingReplies:
    """The table's replies as response-ring records: one message per worker slot per
    flush() (the admissions of a drain; the tokens and finishes of a step); a refusal goes at once.
    A plain step's records are written natively into the same messages (plain_batches,
    step_core.publish_plain); native_plain=False sends every record through this class."""

    def __init__(self, loop, native_plain=True):
        self.loop = loop
        self.native_plain = native_plain
        self.batches = {}           # worker slot -> (bytearray of encoded records, [entries])

    @property
    def plain_batches(self):
        return self.batches if self.native_plain else None

    def _add(self, entry, record):
        slot = entry.owner.slot
        batch = self.batches.get(slot)     # once per token: no setdefault's throwaway lists
        if batch is None:
            batch = self.batches[slot] = (bytearray(), [])
        batch[0].extend(record)
        batch[1].append(entry)

    def admitted(self, entry):
        self._add(entry, encode(Admitted(entry.request_id)))

    def prompt_logprobs(self, entry, entries):
        self._add(entry, encode(PromptLogprobs(entry.request_id, [e.token_id for e in entries],
                                               [e.logprob for e in entries], [list(e.top) for e in entries])))

    def embedding(self, entry, vector):
        self._add(entry, encode(Embedding(entry.request_id, vector.tolist())))

    def tokens(self, entry, out):
        if entry.want_logprobs:
            self._add(entry, encode(Tokens(entry.request_id, [out.token_id], [out.logprob], [list(out.top_logprobs)])))
        else:
            self._add(entry, encode_token(entry.request_id, out.token_id))

    def finished(self, entry, reason):
        seq = entry.seq
        self._add(entry, encode(Finish(entry.request_id, reason, seq.num_prompt_tokens, seq.num_output_tokens,
                                       seq.num_cached_prompt_tokens)))

    def failed(self, entry, kind, message):
        record = Error(entry.request_id, kind, message)
        if entry.seq is None:       # refused at admission: nothing else of it is coming
            self.loop.send(entry.owner.slot, encode(record), entry.request_id)
        else:
            self._add(entry, encode(record))

    def flush(self):
        batches, self.batches = self.batches, {}
        for slot, (records, entries) in batches.items():
            if not self.loop.send(slot, records, entries[0].request_id):
                for entry in entries:           # that worker is gone or stuck: its requests end here
                    if entry.request_id in self.loop.table.entries:
                        self.loop.table.drop(entry)


class EngineLoop:
    """The Engine behind the segment: ring records in, the request table, ring records out."""

    def __init__(self, segment, engine, queue_capacity=256):
        self.seg = segment
        self.engine = engine
        engine.sampler.all_logprobs = False    # logprobs go only to requests that ask: skip the others'
        self.queue_capacity = queue_capacity
        self.replies = RingReplies(self)
        self.table = RequestTable(engine, self.replies)
        self.draining = False
        self._prefix = (0, 0)       # block manager counters already added to the stats
        self._preemptions = 0       # scheduler counter already added to the stats
        self._prompt_tokens = 0     # table counter already added to the stats
        self._spec = (0, 0, 0)      # speculator counters already added to the stats
        self._spec_lengths = []     # its acceptance-length counts already observed
        self._next_check = 0.0

    @property
    def requests(self):
        return self.table.entries

    # -- the loop ---------------------------------------------------------------
    def run(self, stop_requested, drain_timeout=30.0, parent_pid=None):
        """Serve until stop_requested() turns true, then drain and return."""
        deadline = None
        while True:
            if deadline is None and stop_requested():
                self.draining = True
                self.seg.engine_status = EngineStatus.DRAINING
                deadline = time.monotonic() + drain_timeout
                log.info("draining %d requests (up to %g s)", len(self.table), drain_timeout)
            if deadline is not None and (not self.engine.has_work or time.monotonic() >= deadline):
                break
            self.run_once()
            if parent_pid is not None and os.getppid() != parent_pid and deadline is None:
                log.error("the launcher (pid %d) is gone; stopping", parent_pid)
                stop_requested = _always
        self.drain_ring()
        self.table.fail_all(ErrorKind.SHUTTING_DOWN, "the engine is shutting down")
        self.replies.flush()

    def run_once(self):
        if not self.engine.has_work:
            self.seg.request_ring.wait_readable(IDLE_WAIT)
        self.drain_ring()
        # admissions go now, not with the step's tokens: a stream opens (status line, keep-alives)
        # while its prompt's prefill runs
        self.replies.flush()
        if self.engine.has_work:
            self.step()
        self.replies.flush()
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
                self.refuse_malformed(message, e)
                continue
            if isinstance(record, Submit):
                self.submit(record)
            elif isinstance(record, Abort):
                self.table.abort(record.request_id)
            else:
                log.error("unexpected %s record on the request ring", type(record).__name__)

    def refuse_malformed(self, message, error):
        """A SUBMIT that does not decode (another build's layout, say) is answered 400,
        so its client does not wait; anything else malformed is only logged."""
        header = peek_header(message)
        log.error("malformed request record: %s", error)
        if header is not None and header[0] == RecordType.SUBMIT:
            self.reply(header[1], Error(header[2], ErrorKind.BAD_REQUEST,
                                        f"the engine could not read this request: {error}"))

    # -- requests ---------------------------------------------------------------
    def submit(self, rec):
        if self.draining:
            return self.reply(rec.worker, Error(rec.request_id, ErrorKind.SHUTTING_DOWN, "the engine is shutting down"))
        if len(self.engine.scheduler.waiting) >= self.queue_capacity:
            return self.reply(rec.worker, Error(rec.request_id, ErrorKind.OVERLOADED,
                                                "the server is at capacity; retry later"))
        try:
            if rec.extensions:
                raise ValueError("the request carries extensions this engine does not know")
            owner = _Worker(rec.worker, self.seg.slot_pid(rec.worker))
        except ValueError as e:
            return self.reply(rec.worker, Error(rec.request_id, ErrorKind.BAD_REQUEST, str(e)))
        self.table.admit(rec.request_id, owner, rec.prompt_ids, rec.params)

    def step(self):
        self.seg.add("generation_tokens", self.table.step())
        if self.engine.speculator is not None:
            self.publish_speculation(self.engine.speculator)
        started = self.table.started_prompt_tokens
        if started != self._prompt_tokens:
            self.seg.add("prompt_tokens", started - self._prompt_tokens)
            self._prompt_tokens = started

    def abort_orphans(self):
        """Drop the requests of worker processes that died or left, even where a
        new worker has already claimed the slot."""
        owners = {}
        for entry in list(self.table.entries.values()):
            slot = entry.owner.slot
            if slot not in owners:
                pid = self.seg.slot_pid(slot)
                owners[slot] = pid if process_alive(pid) else None
            if owners[slot] != entry.owner.pid:
                self.table.drop(entry)

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

    def publish_speculation(self, spec):
        """The speculator's counters and acceptance lengths since the last call (called by
        step, before its tokens are flushed: a client that has its tokens sees them counted)."""
        counts = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)
        if counts == self._spec:
            return
        for name, now, before in zip(("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                      "spec_decode_num_accepted_tokens"), counts, self._spec):
            self.seg.add(name, now - before)
        self._spec = counts
        seen = self._spec_lengths + [0] * (len(spec.accepted_per_draft) - len(self._spec_lengths))
        for accepted, (now, before) in enumerate(zip(spec.accepted_per_draft, seen)):
            if now != before:
                self.seg.observe("spec_decode_acceptance_length", accepted, now - before)
        self._spec_lengths = list(spec.accepted_per_draft)


def _always():
    return True


def run_engine(segment_name, engine_kwargs, queue_capacity=256, drain_timeout=30.0, log_level="info",
               log_format="pretty", service_name="pyforge"):
    """The engine process's entry point (a multiprocessing target)."""
    from pyforge.server.logs import configure     # the server's log format: one stream, one shape
    configure(log_level, log_format, service_name)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group: the launcher decides
    parent = os.getppid()
    seg = Segment.attach(segment_name)
    try:
        seg.engine_pid = os.getpid()
        from pyforge.engine.config import EngineConfig
        from pyforge.engine.engine import Engine     # the heavy imports happen in this process only
        from pyforge.engine.model_runner import KVCache
        try:
            engine = Engine(EngineConfig(**engine_kwargs))
        except (ValueError, OSError) as e:
            log.error("could not load the model: %s", e)
            raise SystemExit(2) from None
        loop = EngineLoop(seg, engine, queue_capacity)
        loop.publish_stats()
        seg.publish_facts(engine.facts)
        seg.engine_status = EngineStatus.READY
        kv = engine.kv_cache
        log.info("ready: %s (max_model_len %d; KV cache %s, %d tokens, %d bytes per token)",
                 engine_kwargs.get("model_path"), engine.max_model_len, engine.backend.kv_dtype,
                 kv.n_blocks * kv.block_size, KVCache.bytes_per_token(engine.config, engine.backend.kv_dtype_bytes))
        loop.run(lambda: bool(stop), drain_timeout, parent_pid=parent)
        seg.engine_status = EngineStatus.STOPPED     # only an orderly stop says so: a crash leaves it be
    finally:
        seg.close()
    log.info("stopped")


def main(argv=None):
    """python -m pyforge.serving.engine_process SEGMENT ENGINE_KWARGS_JSON QUEUE_CAPACITY DRAIN_TIMEOUT
    [LOG_LEVEL [LOG_FORMAT [SERVICE_NAME]]] (what the launcher runs)."""
    import json
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if not 4 <= len(argv) <= 7:
        raise SystemExit(main.__doc__)
    run_engine(argv[0], json.loads(argv[1]), int(argv[2]), float(argv[3]), *argv[4:])


if __name__ == "__main__":
    main()
