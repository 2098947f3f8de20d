"""The IPC contract between the HTTP workers and the engine (restated for C, byte for
byte, in native/pyforge_ipc.h; tests/serving/c_client.c is a client built from it).

Rings (all in one shared-memory segment, see segment.py):

  request ring       written by every worker process (any thread; the ring's
                     writer lock keeps messages whole), read by the engine
                     alone.  Records: SUBMIT, ABORT.
  response ring [s]  one per worker slot s: written by the engine alone,
                     read by the worker process holding slot s alone (one
                     reader thread, which routes records to the waiting
                     request by request_id).  Records: ADMITTED, TOKENS,
                     PROMPT_LOGPROBS, EMBEDDING, FINISH, ERROR.

A request ring message is one record. A response ring message is a batch:
one or more records back to back (each record's length follows from its own
counts), so the engine writes one message per worker per step however many
of that worker's requests advanced (encode_batch / decode_batch). A request's
responses are ADMITTED (the engine queued it), zero or more TOKENS (a request
that asks for prompt logprobs gets PROMPT_LOGPROBS records, in prompt order,
before its first TOKENS, as its prefill chunks compute them; an embedding
request, one whose SUBMIT carries POOLING, gets one EMBEDDING and no TOKENS), then
exactly one FINISH or ERROR, in ring order; a refused request gets its ERROR
alone; after an ABORT the engine still sends the FINISH (reason "abort") so
the worker can forget the request.

How each side wakes the other (futexes in each ring's header, shm_ring.h):
  - A writer publishes, then FUTEX_WAKEs the ring's reader only if it sleeps.
  - The engine with nothing to run sleeps in request_ring.wait_readable();
    with work it drains the ring with get_all() once per step, never sleeping.
  - A worker's reader thread sleeps in response_ring.get(timeout).
  - A writer facing a full ring sleeps until the reader frees space; workers
    pass a timeout and answer a False put() with 503.
  - The engine's liveness is the segment header's status word and heartbeat.

Request ids are unique within a segment: workers make them with
request_id(slot, n), the slot in the top 16 bits, so ids never collide
across workers.

Byte layout: little-endian, packed, one record per message.

  header  u8 type | u8 flags (0) | u16 worker | u64 request_id      12 bytes
  SUBMIT  u32 n_prompt | u16 params_version (1) | u16 n_stop | PARAMS
          | i32 stop_token_ids[n_stop] | i32 prompt_ids[n_prompt]
          | u32 n_ext | extensions: n_ext bytes of back-to-back entries
  EXTENSION  u16 tag | u16 0 | u32 n | value: n bytes   (an optional request
          feature, sent only when set; tag 1 GRAMMAR: SamplingParams.grammar as
          UTF-8; 2 LOGIT_BIAS: i32 token_ids[k] | f64 biases[k] (n = 12k);
          3 MIN_TOKENS: u32; 4 PROMPT_LOGPROBS: u32 (top alternatives); 5 POOLING:
          u32 (Pooling: 1 mean, 2 last; an embedding request, engine/pooling.py); 6
          MAX_DRAFTS: u32 (SamplingParams.max_drafts; 0: no speculation). An
          engine refuses a SUBMIT with a tag it does not know: never half-honoured)
  PARAMS  (version 1, 68 bytes) f64 temperature | f64 top_p | f64 min_p
          | f64 repetition_penalty | f64 presence_penalty | f64 frequency_penalty
          | i32 top_k | u32 max_tokens | u64 seed (mod 2^64) | u8 flags
          (1: seed set, 2: ignore_eos, 4: logprobs set) | u8 logprobs | u16 0
  ABORT   -
  ADMITTED -
  TOKENS  u32 n | u16 n_top | u16 has (1: logprobs, 2: top_logprobs)
          | i32 token_ids[n] | f32 logprobs[n]                      if has & 1
          | i32 top_ids[n * n_top] | f32 top_logprobs[n * n_top]     if has & 2
  PROMPT_LOGPROBS  the TOKENS layout with has = 3: prompt tokens from the second
          on, each with its logprob and top alternatives
  EMBEDDING  u32 n | f32 values[n]   the L2-normalised pooled final hidden state
          (n = the model's hidden size: 16 KiB at 4096; a message longer than a
          ring's capacity travels in fragments, shm_ring.h, so no size is refused)
  FINISH  u32 prompt_tokens | u32 completion_tokens | u32 cached_tokens
          | u8 finish_reason (FinishReason: 1 stop, 2 length, 3 abort)
  ERROR   u16 kind (ErrorKind: 1 bad request, 2 overloaded, 3 out of memory,
          4 shutting down, 5 internal) | u32 n | message: UTF-8[n]

`worker` is the submitting worker's slot in SUBMIT (its responses go to that
slot's ring) and 0 in every other record. TOKENS usually carries one token
without logprobs: encode_token() writes exactly those bytes in one pack. Logprobs travel as float32, the
sampler's own precision. Decoding checks every count against the bytes
present before allocating, and raises ValueError on anything malformed.
"""
import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

from pyforge.engine.errors import ErrorKind
from pyforge.engine.sampling_params import SamplingParams

HEADER = struct.Struct("<BBHQ")
_SUBMIT = struct.Struct("<IHH")
_PARAMS = struct.Struct("<ddddddiIQBBH")
PARAMS_VERSION = 1
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_SEED_SET, _IGNORE_EOS, _LOGPROBS_SET = 1, 2, 4
_U64 = (1 << 64) - 1
_TOKENS = struct.Struct("<IHH")
_ONE_TOKEN = struct.Struct("<BBHQIHHi")     # HEADER + _TOKENS + one token id: the common TOKENS record
_FINISH = struct.Struct("<IIIB")
_ERROR = struct.Struct("<HI")
_U32 = struct.Struct("<I")
_EXTENSION = struct.Struct("<HHI")
_BIAS_ENTRY = 12        # LOGIT_BIAS: an i32 id and an f64 bias per entry

_HAS_LOGPROBS = 1
_HAS_TOP = 2
_SWAP = sys.byteorder != "little"   # array() is native-endian; the layout is little
_SLOT_SHIFT = 48


class FinishReason(IntEnum):
    """Why a request ended, as FINISH carries it; the names are OpenAI's finish_reason."""
    STOP = 1
    LENGTH = 2
    ABORT = 3


_REASON_CODES = {r.name.lower(): r for r in FinishReason}


class ExtensionTag(IntEnum):
    """What a SUBMIT extension entry carries."""
    GRAMMAR = 1
    LOGIT_BIAS = 2
    MIN_TOKENS = 3
    PROMPT_LOGPROBS = 4
    POOLING = 5
    MAX_DRAFTS = 6


class Pooling(IntEnum):
    """A POOLING extension's value: SamplingParams.pooling."""
    MEAN = 1
    LAST = 2


class RecordType(IntEnum):
    SUBMIT = 1
    ABORT = 2
    TOKENS = 3
    FINISH = 4
    ERROR = 5
    ADMITTED = 6
    PROMPT_LOGPROBS = 7
    EMBEDDING = 8


def request_id(slot: int, n: int) -> int:
    """The n-th request id of the worker in `slot`: unique within a segment."""
    return slot << _SLOT_SHIFT | n & ((1 << _SLOT_SHIFT) - 1)


def slot_of(request_id: int) -> int:
    return request_id >> _SLOT_SHIFT


# -- the records -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Submit:
    request_id: int
    worker: int
    prompt_ids: list[int]
    params: SamplingParams      # decoding checks it again (SamplingParams' own checks)
    extensions: bytes = b""     # extension entries this build does not know (sent as they are)
    TYPE: ClassVar[RecordType] = RecordType.SUBMIT

    def _body(self):
        stops = self.params.stop_token_ids
        ext = _pack_extensions(self.params) + self.extensions
        return (_pack(_SUBMIT, len(self.prompt_ids), PARAMS_VERSION, len(stops)) + _pack_params(self.params)
                + _int32s(stops) + _int32s(self.prompt_ids) + _pack(_U32, len(ext)) + ext)

    @classmethod
    def _parse(cls, r, worker, request_id):
        n_prompt, version, n_stop = r.unpack(_SUBMIT)
        if version != PARAMS_VERSION:
            raise ValueError(f"SUBMIT params version {version}, this build reads {PARAMS_VERSION}")
        fields = _unpack_params(r.unpack(_PARAMS))
        stops = r.int32s(n_stop)
        prompt = r.int32s(n_prompt)
        (n_ext,) = r.unpack(_U32)
        known, unknown = _unpack_extensions(r.take(n_ext))
        return cls(request_id, worker, prompt, SamplingParams(**fields, **known, stop_token_ids=stops), unknown)


def _pack_params(p):
    flags = ((_SEED_SET if p.seed is not None else 0) | (_IGNORE_EOS if p.ignore_eos else 0)
             | (_LOGPROBS_SET if p.logprobs is not None else 0))
    return _pack(_PARAMS, *(float(getattr(p, name)) for name in _FLOAT_PARAMS), p.top_k, p.max_tokens,
                 (p.seed or 0) & _U64, flags, p.logprobs or 0, 0)


def _unpack_params(values):
    *floats, top_k, max_tokens, seed, flags, logprobs, _ = values
    return {**dict(zip(_FLOAT_PARAMS, floats)), "top_k": top_k, "max_tokens": max_tokens,
            "seed": seed if flags & _SEED_SET else None, "ignore_eos": bool(flags & _IGNORE_EOS),
            "logprobs": logprobs if flags & _LOGPROBS_SET else None}


def _pack_extensions(p):
    entries = []
    if p.grammar is not None:
        entries.append((ExtensionTag.GRAMMAR, p.grammar.encode()))
    if p.logit_bias:
        ids, biases = zip(*p.logit_bias)
        entries.append((ExtensionTag.LOGIT_BIAS, _int32s(ids) + _array("d", biases, "logit biases must be numbers")))
    if p.min_tokens:
        entries.append((ExtensionTag.MIN_TOKENS, _pack(_U32, p.min_tokens)))
    if p.prompt_logprobs is not None:
        entries.append((ExtensionTag.PROMPT_LOGPROBS, _pack(_U32, p.prompt_logprobs)))
    if p.pooling is not None:
        entries.append((ExtensionTag.POOLING, _pack(_U32, Pooling[p.pooling.upper()])))
    if p.max_drafts is not None:
        entries.append((ExtensionTag.MAX_DRAFTS, _pack(_U32, p.max_drafts)))
    return b"".join(_pack(_EXTENSION, tag, 0, len(value)) + value for tag, value in entries)


def _unpack_extensions(data):
    """({SamplingParams field: value} of the known entries, the unknown entries' bytes)."""
    r, known, unknown = _Reader(data), {}, []
    while r.pos < len(data):
        if len(data) - r.pos < _EXTENSION.size:
            raise ValueError(f"malformed SUBMIT extensions: {len(data) - r.pos} stray bytes")
        start = r.pos
        tag, flags, n = r.unpack(_EXTENSION)
        value = _Reader(r.take(n))
        if flags or tag not in _EXTENSION_FIELDS:
            unknown.append(bytes(data[start:r.pos]))
            continue
        field, read = _EXTENSION_FIELDS[tag]
        known[field] = read(value, n)
        value.end(f"{ExtensionTag(tag).name} extension")
    return known, b"".join(unknown)


def _read_bias(r, n):
    if n % _BIAS_ENTRY:
        raise ValueError(f"a LOGIT_BIAS extension of {n} bytes is not whole entries")
    k = n // _BIAS_ENTRY
    return tuple(zip(r.int32s(k), r.float64s(k)))


_EXTENSION_FIELDS = {           # tag -> (SamplingParams field, reader(value, n))
    ExtensionTag.GRAMMAR: ("grammar", lambda r, n: r.text(n)),
    ExtensionTag.LOGIT_BIAS: ("logit_bias", _read_bias),
    ExtensionTag.MIN_TOKENS: ("min_tokens", lambda r, n: r.unpack(_U32)[0]),
    ExtensionTag.PROMPT_LOGPROBS: ("prompt_logprobs", lambda r, n: r.unpack(_U32)[0]),
    ExtensionTag.POOLING: ("pooling", lambda r, n: _read_pooling(r.unpack(_U32)[0])),
    ExtensionTag.MAX_DRAFTS: ("max_drafts", lambda r, n: r.unpack(_U32)[0]),
}


def _read_pooling(code):
    try:
        return Pooling(code).name.lower()
    except ValueError:
        raise ValueError(f"unknown pooling {code}") from None


class _Bodiless:
    """A record that is its header alone (ABORT, ADMITTED)."""
    __slots__ = ()

    def _body(self):
        return b""

    @classmethod
    def _parse(cls, r, worker, request_id):
        return cls(request_id)


@dataclass(frozen=True, slots=True)
class Abort(_Bodiless):
    request_id: int
    TYPE: ClassVar[RecordType] = RecordType.ABORT


@dataclass(frozen=True, slots=True)
class Admitted(_Bodiless):
    request_id: int
    TYPE: ClassVar[RecordType] = RecordType.ADMITTED


@dataclass(frozen=True, slots=True)
class Tokens:
    request_id: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    TYPE: ClassVar[RecordType] = RecordType.TOKENS

    def _body(self):
        n, top = len(self.token_ids), self.top_logprobs
        n_top = len(top[0]) if top else 0
        _check_lengths(n, self.logprobs, top, n_top)
        has = (_HAS_LOGPROBS if self.logprobs is not None else 0) | (_HAS_TOP if top is not None else 0)
        parts = [_pack(_TOKENS, n, n_top, has), _int32s(self.token_ids)]
        if self.logprobs is not None:
            parts.append(_float32s(self.logprobs))
        if top is not None:
            parts.append(_int32s([i for row in top for i, _ in row]))
            parts.append(_float32s([lp for row in top for _, lp in row]))
        return b"".join(parts)

    @classmethod
    def _parse(cls, r, worker, request_id):
        n, n_top, has = r.unpack(_TOKENS)
        if has & ~(_HAS_LOGPROBS | _HAS_TOP):
            raise ValueError(f"TOKENS record has unknown flags {has:#x}")
        ids = r.int32s(n)
        logprobs = r.float32s(n) if has & _HAS_LOGPROBS else None
        top = None
        if has & _HAS_TOP:
            top_ids, top_lps = r.int32s(n * n_top), r.float32s(n * n_top)
            pairs = list(zip(top_ids, top_lps))
            top = [pairs[i * n_top:(i + 1) * n_top] for i in range(n)]
        return cls(request_id, ids, logprobs, top)


@dataclass(frozen=True, slots=True)
class PromptLogprobs(Tokens):
    """Prompt tokens (from the second on) with their logprobs and top alternatives:
    the TOKENS layout, both lists always present."""
    TYPE: ClassVar[RecordType] = RecordType.PROMPT_LOGPROBS

    @classmethod
    def _parse(cls, r, worker, request_id):
        record = Tokens._parse.__func__(cls, r, worker, request_id)
        if record.logprobs is None or record.top_logprobs is None:
            raise ValueError("a PROMPT_LOGPROBS record must carry logprobs and top logprobs")
        return record


@dataclass(frozen=True, slots=True)
class Embedding:
    request_id: int
    values: list[float]         # float32 on the wire
    TYPE: ClassVar[RecordType] = RecordType.EMBEDDING

    def _body(self):
        return _pack(_U32, len(self.values)) + _array("f", self.values, "embedding values must be numbers")

    @classmethod
    def _parse(cls, r, worker, request_id):
        (n,) = r.unpack(_U32)
        return cls(request_id, r.float32s(n))


@dataclass(frozen=True, slots=True)
class Finish:
    request_id: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    TYPE: ClassVar[RecordType] = RecordType.FINISH

    def _body(self):
        reason = _REASON_CODES.get(self.finish_reason)
        if reason is None:
            raise ValueError(f"finish_reason must be one of {', '.join(_REASON_CODES)}, got {self.finish_reason!r}")
        return _pack(_FINISH, self.prompt_tokens, self.completion_tokens, self.cached_tokens, reason)

    @classmethod
    def _parse(cls, r, worker, request_id):
        prompt, completion, cached, code = r.unpack(_FINISH)
        try:
            reason = FinishReason(code).name.lower()
        except ValueError:
            raise ValueError(f"unknown finish reason {code}") from None
        return cls(request_id, reason, prompt, completion, cached)


@dataclass(frozen=True, slots=True)
class Error:
    request_id: int
    kind: ErrorKind
    message: str
    TYPE: ClassVar[RecordType] = RecordType.ERROR

    def _body(self):
        if not isinstance(self.kind, ErrorKind):
            raise ValueError(f"an ERROR record's kind must be an ErrorKind, got {self.kind!r}")
        message = self.message.encode()
        return _pack(_ERROR, self.kind, len(message)) + message

    @classmethod
    def _parse(cls, r, worker, request_id):
        code, n = r.unpack(_ERROR)
        try:
            kind = ErrorKind(code)
        except ValueError:
            raise ValueError(f"unknown error kind {code}") from None
        return cls(request_id, kind, r.text(n))


Record = Union[Submit, Abort, Admitted, Tokens, PromptLogprobs, Embedding, Finish, Error]
_CLASSES = {cls.TYPE: cls for cls in (Submit, Abort, Admitted, Tokens, PromptLogprobs, Embedding, Finish, Error)}


def encode(record: Record) -> bytes:
    """The record's bytes; ValueError if a field does not fit its layout."""
    if type(record) not in _CLASSES.values():
        raise ValueError(f"not a record: {record!r}")
    worker = record.worker if isinstance(record, Submit) else 0
    return _pack(HEADER, record.TYPE, 0, worker, record.request_id) + record._body()


def encode_token(request_id: int, token_id: int) -> bytes:
    """encode(Tokens(request_id, [token_id])), in one struct pack."""
    try:
        return _ONE_TOKEN.pack(RecordType.TOKENS, 0, 0, request_id, 1, 0, 0, token_id)
    except struct.error as e:
        raise ValueError(f"record field out of range: {e}") from None


def encode_batch(records) -> bytes:
    """Records back to back: one response ring message (decode_batch reads it)."""
    return b"".join(encode(r) for r in records)


def decode(data) -> Record:
    """The record in `data` (bytes-like); ValueError if it is not exactly one
    well-formed record."""
    r = _Reader(memoryview(data).cast("B"))
    record = _parse_record(r)
    r.end(type(record).TYPE.name)
    return record


def peek_header(data):
    """(RecordType, worker, request_id) of a message's first record, or None if even
    its header is cut short: who to answer when the rest is malformed."""
    if len(data) < HEADER.size:
        return None
    rtype, _, worker, request_id = HEADER.unpack_from(data, 0)
    return rtype, worker, request_id


def decode_batch(data) -> list[Record]:
    """The records in a response ring message, in order; ValueError unless it
    is one or more well-formed records and nothing else."""
    buf = memoryview(data).cast("B")
    r, out, n = _Reader(buf), [], len(buf)
    if not n:
        raise ValueError("truncated record: an empty message")
    while r.pos < n:
        if buf[r.pos] == RecordType.TOKENS and n - r.pos >= _ONE_TOKEN.size:
            _, flags, _, request_id, count, _, has, token = _ONE_TOKEN.unpack_from(buf, r.pos)
            if count == 1 and not flags and not has:     # what decode would make of it, quicker
                r.pos += _ONE_TOKEN.size
                out.append(Tokens(request_id, [token]))
                continue
        out.append(_parse_record(r))
    return out


def _parse_record(r):
    rtype, flags, worker, request_id = r.unpack(HEADER)
    cls = _CLASSES.get(rtype)
    if cls is None:
        raise ValueError(f"unknown record type {rtype}")
    if flags:
        raise ValueError(f"record flags must be 0, got {flags:#x}")
    return cls._parse(r, worker, request_id)


# -- encoding helpers --------------------------------------------------------

def _pack(layout, *values):
    try:
        return layout.pack(*values)
    except struct.error as e:
        raise ValueError(f"record field out of range: {e}") from None


def _int32s(values):
    return _array("i", values, "token ids must be int32")


def _float32s(values):
    return _array("f", values, "logprobs must be numbers")


def _array(code, values, what):
    try:
        a = array(code, values)
    except (TypeError, OverflowError) as e:
        raise ValueError(f"{what}: {e}") from None
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def _check_lengths(n, logprobs, top, n_top):
    if logprobs is not None and len(logprobs) != n:
        raise ValueError(f"{len(logprobs)} logprobs for {n} tokens")
    if top is not None and (len(top) != n or any(len(row) != n_top for row in top)):
        raise ValueError(f"top_logprobs must hold {n} rows of equal length")


# -- decoding ----------------------------------------------------------------

class _Reader:
    """A cursor over untrusted bytes: every read checks the bytes are there."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n):
        if n > len(self.buf) - self.pos:
            raise ValueError(f"truncated record: needs {n} more bytes at {self.pos}, has {len(self.buf) - self.pos}")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, layout):
        return layout.unpack(self.take(layout.size))

    def int32s(self, n):
        return self._array("i", n)

    def float32s(self, n):
        return self._array("f", n)

    def float64s(self, n):
        return self._array("d", n)

    def _array(self, code, n):
        a = array(code)
        a.frombytes(self.take(n * a.itemsize))
        if _SWAP:
            a.byteswap()
        return a.tolist()

    def text(self, n):
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"record text is not UTF-8: {e}") from None

    def end(self, what):
        if self.pos != len(self.buf):
            raise ValueError(f"{len(self.buf) - self.pos} stray bytes after a {what} record")
