"""The shared-memory segment that joins the HTTP workers and the engine (its layout in
C: native/pyforge_ipc.h).

One POSIX shared-memory object (/dev/shm/<name>), laid out as:

  offset 0            header, one page:
                        0  8s  magic b"PYFORGE\\0"    32 u32 creator pid
                        8  u32 version               36 u32 stats layout (crc32)
                       12  u32 n_workers             40 u32 engine status  (atomic)
                       16  u64 request ring bytes    44 u32 engine pid     (atomic)
                       24  u64 response ring bytes   48 u64 engine heartbeat (atomic)
                                                     56 u32 max_model_len  (engine facts,
                                                     60 u32 vocab_size      written before READY)
                                                     64 u32 n_eos
                                                     68 u32 eos_ids[32]
                                                    196 u32 hidden_size
  PAGE                worker slots, 64 bytes each: u32 pid (0: free) | u32 - | u64 claims
  page-aligned        request ring (ring_size(request_ring_bytes))
  page-aligned        response ring per slot (ring_size(response_ring_bytes)) each
  page-aligned        engine stats: ENGINE_STATS, 8 bytes a word
  then                worker stats: WORKER_STATS, one 64-byte-aligned block per slot

Who writes what: the creator (the launcher) formats everything; the engine
writes its status, pid, heartbeat and the engine stats; each worker process
claims a slot (compare-and-swap of its pid into a free or dead slot's pid word)
and writes only its own slot's stats. Everyone reads everything. Ring traffic
is described in records.py.

The creator owns the segment's lifetime: it unlinks it on shutdown, and
cleanup_stale() unlinks segments whose creator died without doing so.
"""
import bisect
import functools
import os
import re
import secrets
import struct
import sys
import zlib
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

from pyforge.engine.config import MAX_EOS_IDS, EngineFacts
from pyforge.ipc.records import request_id
from pyforge.native.ipc import Ring, SharedWords, ring_size

SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "pyforge-"
MAGIC = b"PYFORGE\0"
VERSION = 3
PAGE = 4096
SLOT_BYTES = 64

_STATIC = struct.Struct("<8sIIQQII")    # magic .. stats layout
_STATUS, _ENGINE_PID, _HEARTBEAT = 40, 44, 48
_MAX_MODEL_LEN, _VOCAB_SIZE, _N_EOS, _EOS_IDS, _HIDDEN_SIZE = 56, 60, 64, 68, 196   # the engine's facts (EngineFacts)
_SLOT_PID, _SLOT_CLAIMS = 0, 8


class EngineStatus(IntEnum):
    STARTING = 0
    READY = 1
    DRAINING = 2
    STOPPED = 3


# -- the stats area: a written-down list of named fields ----------------------

@dataclass(frozen=True)
class Stat:
    """One metric. Counters and gauges are one 8-byte word (int64 or float64);
    a histogram is one int64 count per bucket (upper bounds `buckets`, then
    +Inf; not cumulative), a float64 sum and an int64 count."""
    name: str
    kind: str                            # "counter" | "gauge" | "histogram"
    help: str                            # the /metrics HELP line
    dtype: str = "i64"                   # counters and gauges: "i64" | "f64"
    buckets: tuple[float, ...] = ()

    @property
    def exported_name(self):
        """Its Prometheus name after the pyforge: prefix (vLLM's: counters end in _total)."""
        return self.name + "_total" if self.kind == "counter" else self.name

    @property
    def words(self):
        return len(self.buckets) + 3 if self.kind == "histogram" else 1


# The one table of metrics: names follow vLLM's (pyforge:<name>, counters get _total
# on export); server/metrics.py exports exactly these, in this order.
ENGINE_STATS = (
    Stat("num_requests_running", "gauge", "Requests in the running batch."),
    Stat("num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    Stat("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", "f64"),
    Stat("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    Stat("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    Stat("prompt_tokens", "counter", "Prefilled prompt tokens."),
    Stat("generation_tokens", "counter", "Generated tokens."),
    Stat("num_preemptions", "counter", "Preempted sequences."),
    Stat("spec_decode_num_drafts", "counter", "Speculative drafts verified (sequences x steps with drafts)."),
    Stat("spec_decode_num_draft_tokens", "counter", "Speculative draft tokens verified."),
    Stat("spec_decode_num_accepted_tokens", "counter", "Speculative draft tokens accepted."),
    Stat("spec_decode_acceptance_length", "histogram", "Draft tokens accepted per verified draft.",
         buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)),
)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
WORKER_STATS = (
    Stat("requests", "counter", "HTTP generation requests received."),
    Stat("request_success", "counter", "Requests answered successfully."),
    Stat("request_failure", "counter", "Requests answered with an error."),
    Stat("time_to_first_token_seconds", "histogram", "Time to first token.", buckets=_TTFT_BUCKETS),
    Stat("inter_token_latency_seconds", "histogram", "Time between tokens.", buckets=_ITL_BUCKETS),
    Stat("e2e_request_latency_seconds", "histogram", "End-to-end request latency.", buckets=_LATENCY_BUCKETS),
)
# Two builds with different field lists must not share a segment.
STATS_LAYOUT = zlib.crc32(repr((ENGINE_STATS, WORKER_STATS)).encode())


def _align(n, to):
    return -(-n // to) * to


@functools.cache
def _field_offsets(stats):
    """name -> (byte offset within its block, Stat); and the block's size."""
    offsets, at = {}, 0
    for s in stats:
        offsets[s.name] = (at, s)
        at += 8 * s.words
    return offsets, _align(at, 64)   # a slot's block never shares a cache line


@dataclass(frozen=True)
class Layout:
    """Byte offsets of every part of a segment (see the module docstring)."""
    n_workers: int
    request_ring_bytes: int
    response_ring_bytes: int

    def __post_init__(self):
        if not 1 <= self.n_workers <= 0xFFFF:
            raise ValueError(f"n_workers must be in 1..65535, got {self.n_workers}")
        ring_size(self.request_ring_bytes)     # raises unless a power of two in range
        ring_size(self.response_ring_bytes)

    @functools.cached_property
    def request_ring(self):
        return _align(PAGE + SLOT_BYTES * self.n_workers, PAGE)

    @functools.cached_property
    def response_stride(self):
        return _align(ring_size(self.response_ring_bytes), PAGE)

    @functools.cached_property
    def _first_response_ring(self):
        return _align(self.request_ring + ring_size(self.request_ring_bytes), PAGE)

    def response_ring(self, slot):
        return self._first_response_ring + slot * self.response_stride

    @functools.cached_property
    def engine_stats(self):
        return self.response_ring(self.n_workers)

    def worker_stats(self, slot):
        return self.engine_stats + _field_offsets(ENGINE_STATS)[1] + slot * _field_offsets(WORKER_STATS)[1]

    @property
    def total(self):
        return self.worker_stats(self.n_workers)


# -- POSIX shared memory without the resource tracker ------------------------

def new_name(prefix=DEFAULT_PREFIX):
    """`<prefix><pid>-<random>`: cleanup_stale() reads the creator's pid from it."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def _open_shm(name, create=False, size=0):
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)
    shm = SharedMemory(name, create=create, size=size)
    # Before 3.13 every SharedMemory registers with multiprocessing's resource
    # tracker, which unlinks it when *this* process exits: any worker exiting
    # would pull the segment out from under the engine and the other workers.
    # The creator owns the lifetime (unlink, or cleanup_stale after a crash).
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _unlink(name):
    # shm_unlink() is unlink() in /dev/shm on Linux; SharedMemory.unlink()
    # before 3.13 would also unregister again, and the tracker complains.
    os.unlink(os.path.join(SHM_DIR, name))


def process_alive(pid):
    """A live process, zombies not counted: a dead worker, engine or launcher may
    linger as a zombie until its parent reaps it. The one liveness check of every
    side of the segment."""
    if not 0 < pid < 1 << 31:
        return False                # not a pid (a garbage word, or a crafted name)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:
        return True                 # someone else's process that we may not read: alive
    return state not in (b"Z", b"X")


def cleanup_stale(prefix=DEFAULT_PREFIX):
    """Unlink segments named `<prefix><pid>-<hex>` whose creator pid is dead;
    returns their names."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]+")
    removed = []
    for name in sorted(os.listdir(SHM_DIR)):
        match = pattern.fullmatch(name)
        if match and not process_alive(int(match.group(1))):
            try:
                _unlink(name)
            except FileNotFoundError:
                continue            # another cleaner was faster
            removed.append(name)
    return removed


# -- the segment ---------------------------------------------------------------

class Segment:
    """A mapped segment: rings, worker slots, engine state and stats."""

    def __init__(self, shm, layout):
        self.shm, self.layout = shm, layout
        self.name = shm.name
        self._words = SharedWords(shm.buf, 0, layout.total)
        self._rings = {}
        self._slot = None
        self._engine_fields = _field_offsets(ENGINE_STATS)[0]
        self._worker_fields = _field_offsets(WORKER_STATS)[0]
        # name -> (absolute offset, Stat) for what this process may write: the
        # engine fields, plus its own slot's worker fields once it holds one
        self._writable = {name: (layout.engine_stats + off, stat) for name, (off, stat) in self._engine_fields.items()}

    @classmethod
    def create(cls, name=None, n_workers=1, request_ring_bytes=8 << 20, response_ring_bytes=4 << 20):
        """Create and format a new segment (name None: new_name())."""
        layout = Layout(n_workers, request_ring_bytes, response_ring_bytes)
        shm = _open_shm(name or new_name(), create=True, size=layout.total)
        seg = cls(shm, layout)
        try:
            seg._format()
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        return seg

    @classmethod
    def attach(cls, name):
        """Map an existing segment; ValueError if it is not one of ours."""
        shm = _open_shm(name)
        try:
            layout = _read_layout(shm)
        except ValueError:
            shm.close()
            raise
        return cls(shm, layout)

    def _format(self):
        """Rings first, header (magic) last: whoever attaches finds it whole.
        Fresh shm is zeroed: free slots, zero stats, status STARTING."""
        lay = self.layout
        self._ring(lay.request_ring, lay.request_ring_bytes, init=True)
        for slot in range(lay.n_workers):
            self._ring(lay.response_ring(slot), lay.response_ring_bytes, init=True)
        header = (MAGIC, VERSION, lay.n_workers, lay.request_ring_bytes, lay.response_ring_bytes,
                  os.getpid(), STATS_LAYOUT)
        _STATIC.pack_into(self.shm.buf, 0, *header)

    def close(self):
        """Release our slot and unmap. Rings from this segment die with it."""
        if self._slot is not None:
            self.release_slot()
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        self._words.close()
        self.shm.close()

    def unlink(self):
        """Remove the name from /dev/shm; mappings stay valid until closed."""
        _unlink(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- rings

    @property
    def request_ring(self):
        return self._ring(self.layout.request_ring, self.layout.request_ring_bytes)

    def response_ring(self, slot):
        self._check_slot(slot)
        return self._ring(self.layout.response_ring(slot), self.layout.response_ring_bytes)

    def _ring(self, offset, capacity, init=False):
        if offset not in self._rings:
            self._rings[offset] = Ring(self.shm.buf, offset, ring_size(capacity), init)
        return self._rings[offset]

    # -- engine state

    @property
    def engine_status(self):
        return EngineStatus(self._words.load_u32(_STATUS))

    @engine_status.setter
    def engine_status(self, status):
        self._words.store_u32(_STATUS, EngineStatus(status))

    @property
    def engine_pid(self):
        return self._words.load_u32(_ENGINE_PID)

    @engine_pid.setter
    def engine_pid(self, pid):
        self._words.store_u32(_ENGINE_PID, pid)

    def publish_facts(self, facts):
        """The engine's EngineFacts: one owner decides them, the workers read them."""
        self._words.store_u32(_MAX_MODEL_LEN, facts.max_model_len)
        self._words.store_u32(_VOCAB_SIZE, facts.vocab_size)
        self._words.store_u32(_HIDDEN_SIZE, facts.hidden_size)
        eos = sorted(facts.eos_ids)
        for i, token in enumerate(eos):
            self._words.store_u32(_EOS_IDS + 4 * i, token)
        self._words.store_u32(_N_EOS, len(eos))

    @property
    def facts(self):
        n_eos = min(self._words.load_u32(_N_EOS), MAX_EOS_IDS)
        return EngineFacts(self._words.load_u32(_MAX_MODEL_LEN), self._words.load_u32(_VOCAB_SIZE),
                           frozenset(self._words.load_u32(_EOS_IDS + 4 * i) for i in range(n_eos)),
                           self._words.load_u32(_HIDDEN_SIZE))

    @property
    def heartbeat(self):
        return self._words.load_i64(_HEARTBEAT)

    def beat(self):
        """The engine loop calls this every step (and while idle)."""
        return self._words.add_i64(_HEARTBEAT, 1)

    # -- worker slots

    @property
    def slot(self):
        """The slot this process holds, or None."""
        return self._slot

    def slot_pid(self, slot):
        self._check_slot(slot)
        return self._words.load_u32(self._slot_at(slot) + _SLOT_PID)

    def claim_slot(self):
        """Take a free slot, else one whose process died; returns its index."""
        if self._slot is not None:
            raise RuntimeError(f"this segment object already holds slot {self._slot}")
        me = os.getpid()
        for slot in range(self.layout.n_workers):
            if self._words.cas_u32(self._slot_at(slot), 0, me):
                return self._claimed(slot)
        for slot in range(self.layout.n_workers):
            owner = self.slot_pid(slot)
            if owner and not process_alive(owner) and self._words.cas_u32(self._slot_at(slot), owner, me):
                return self._claimed(slot)
        raise RuntimeError(f"all {self.layout.n_workers} worker slots are held by live processes")

    def _claimed(self, slot):
        # the slot's stats stay: counters keep growing across owners, as Prometheus expects
        self._slot = slot
        base = self.layout.worker_stats(slot)
        self._writable.update((name, (base + off, stat)) for name, (off, stat) in self._worker_fields.items())
        self._words.add_i64(self._slot_at(slot) + _SLOT_CLAIMS, 1)
        ring = self.response_ring(slot)
        while ring.get_all():       # a dead predecessor's replies: nobody waits for them
            pass
        return slot

    def release_slot(self):
        if self._slot is not None:
            self._words.cas_u32(self._slot_at(self._slot), os.getpid(), 0)
            self._slot = None
            for name in self._worker_fields:
                del self._writable[name]

    def request_ids(self):
        """Ids for this slot's requests (records.request_id: the slot in the top 16
        bits), numbered from the slot's claim count times 2^32, so a new owner
        never reuses a dead one's ids."""
        if self._slot is None:
            raise RuntimeError("claim a slot first")
        claims = self._words.load_i64(self._slot_at(self._slot) + _SLOT_CLAIMS)
        first = request_id(self._slot, (claims & 0xFFFF) << 32)
        return iter(range(first, first + (1 << 32)))

    def _slot_at(self, slot):
        return PAGE + SLOT_BYTES * slot

    def _check_slot(self, slot):
        if not 0 <= slot < self.layout.n_workers:
            raise ValueError(f"slot must be in 0..{self.layout.n_workers - 1}, got {slot}")

    # -- stats

    def add(self, name, value=1):
        """Add to a counter: engine fields from the engine, worker fields from
        a worker (into its own slot)."""
        offset, stat = self._field(name, "counter")
        (self._words.add_f64 if stat.dtype == "f64" else self._words.add_i64)(offset, value)

    def set(self, name, value):
        """Set an engine gauge."""
        offset, stat = self._field(name, "gauge")
        (self._words.store_f64 if stat.dtype == "f64" else self._words.store_i64)(offset, value)

    def observe(self, name, value, count=1):
        """Record `value` in a worker histogram, `count` times over."""
        offset, stat = self._field(name, "histogram")
        n = len(stat.buckets)
        self._words.add_i64(offset + 8 * bisect.bisect_left(stat.buckets, value), count)
        self._words.add_f64(offset + 8 * (n + 1), value * count)
        self._words.add_i64(offset + 8 * (n + 2), count)

    def get(self, name):
        """One engine counter or gauge (stats() reads every field)."""
        if name not in self._engine_fields:
            raise KeyError(f"no engine counter or gauge named {name!r}")
        offset, stat = self._engine_fields[name]
        if stat.kind == "histogram":
            raise ValueError(f"{name} is a histogram")
        return self._read(self.layout.engine_stats + offset, stat)

    def stats(self, slot=None):
        """Every field by name: engine fields, plus worker fields summed over
        all slots (or one slot's). Histograms: {"buckets", "counts", "sum", "count"}."""
        out = {name: self._read(self.layout.engine_stats + off, s) for name, (off, s) in self._engine_fields.items()}
        slots = range(self.layout.n_workers) if slot is None else [slot]
        for name, (off, s) in self._worker_fields.items():
            out[name] = _sum(s, [self._read(self.layout.worker_stats(i) + off, s) for i in slots])
        return out

    def _field(self, name, kind):
        entry = self._writable.get(name)
        if entry is None:
            if name in self._worker_fields:
                raise RuntimeError(f"{name} is a worker stat: claim a slot first")
            raise KeyError(f"no stat named {name!r}")
        offset, stat = entry
        if stat.kind != kind:
            raise ValueError(f"{name} is a {stat.kind}, not a {kind}")
        return offset, stat

    def _read(self, offset, stat):
        w = self._words
        if stat.kind != "histogram":
            return w.load_f64(offset) if stat.dtype == "f64" else w.load_i64(offset)
        n = len(stat.buckets)
        return {"buckets": stat.buckets, "counts": [w.load_i64(offset + 8 * i) for i in range(n + 1)],
                "sum": w.load_f64(offset + 8 * (n + 1)), "count": w.load_i64(offset + 8 * (n + 2))}


def _sum(stat, values):
    if stat.kind != "histogram":
        return sum(values)
    return {"buckets": stat.buckets, "counts": [sum(c) for c in zip(*(v["counts"] for v in values))],
            "sum": sum(v["sum"] for v in values), "count": sum(v["count"] for v in values)}


def _read_layout(shm):
    if shm.size < PAGE:
        raise ValueError(f"{shm.name} is too small to be a pyforge segment")
    magic, version, n_workers, req, resp, _creator, stats_layout = _STATIC.unpack_from(shm.buf, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"{shm.name} is not a pyforge segment of version {VERSION}")
    if stats_layout != STATS_LAYOUT:
        raise ValueError(f"{shm.name} was made by a build with other stats fields")
    layout = Layout(n_workers, req, resp)
    if shm.size < layout.total:
        raise ValueError(f"{shm.name} holds {shm.size} bytes; its header needs {layout.total}")
    return layout
