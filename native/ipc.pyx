# cython: language_level=3, boundscheck=False, wraparound=False
"""Shared-memory transport over shm_ring.c: `Ring`, a message ring between
processes, and `SharedWords`, atomic counters in shared memory.

Layout, framing and the wake protocol are written down in shm_ring.h; what
travels in the rings is written down in pyforge/ipc/records.py.

Both classes hold a buffer export on the memory they were given, so the
mapping cannot be closed under them (mmap / SharedMemory.close() raise
BufferError) until `close()` is called. Blocking calls release the GIL; the C
waits come back at least every 200 ms (PF_WAIT_SLICE_NS) so Python signal
handlers run (Ctrl-C, a SIGTERM drain), then carry on waiting.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t


cdef extern from "shm_ring.h" nogil:
    enum:
        PF_RING_HEADER_SIZE
        PF_RING_MIN_CAPACITY
        PF_RING_MAX_CAPACITY
        PF_FRAME_HEADER
        PF_FRAME_START
        PF_FRAME_END
        PF_RING_OK
        PF_RING_EMPTY
        PF_RING_TIMEOUT
        PF_RING_INTR
        PF_RING_CORRUPT
        PF_RING_EINVAL
        PF_RING_EBADHDR
    uint64_t PF_NO_DEADLINE
    uint64_t PF_NO_WAIT

    ctypedef struct pf_ring:
        uint64_t capacity

    ctypedef struct pf_frame:
        uint32_t flags
        uint64_t data_len
        uint64_t total

    uint64_t pf_now_ns()
    uint64_t pf_ring_capacity_for(uint64_t region_size)
    int pf_ring_init(pf_ring *r, void *base, uint64_t region_size, int format)
    int pf_ring_lock(pf_ring *r, uint64_t deadline)
    void pf_ring_unlock(pf_ring *r)
    uint64_t pf_ring_max_fragment(const pf_ring *r)
    int pf_ring_write_frame(pf_ring *r, uint32_t flags, uint64_t total,
                            const void *data, uint64_t len, uint64_t deadline)
    int pf_ring_wait_readable(pf_ring *r, uint64_t deadline)
    int pf_ring_peek(pf_ring *r, pf_frame *f)
    void pf_ring_read(const pf_ring *r, const pf_frame *f, void *dst)
    void pf_ring_consume(const pf_ring *r, const pf_frame *f)
    int pf_ring_used(const pf_ring *r, uint64_t *used)

    int pf_shm_cas_u32(void *p, uint32_t expected, uint32_t desired)
    uint32_t pf_shm_load_u32(const void *p)
    void pf_shm_store_u32(void *p, uint32_t v)
    int64_t pf_shm_load_i64(const void *p)
    void pf_shm_store_i64(void *p, int64_t v)
    int64_t pf_shm_add_i64(void *p, int64_t v)
    double pf_shm_load_f64(const void *p)
    void pf_shm_store_f64(void *p, double v)
    double pf_shm_add_f64(void *p, double v)


HEADER_SIZE = PF_RING_HEADER_SIZE
MIN_CAPACITY = PF_RING_MIN_CAPACITY
MAX_CAPACITY = PF_RING_MAX_CAPACITY
DEFAULT_MAX_MESSAGE = 256 << 20

cdef enum:
    OP_LOCK, OP_WRITE, OP_READABLE
    NOGIL_COPY = 1 << 16        # copies this long are worth dropping the GIL for


class RingCorruptError(RuntimeError):
    """The ring's shared memory holds impossible cursors or frames."""


def ring_size(capacity):
    """Bytes of shared memory (header + data) for a ring of `capacity` data bytes."""
    c = int(capacity)
    if c < MIN_CAPACITY or c > MAX_CAPACITY or c & (c - 1):
        raise ValueError(f"capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {capacity!r}")
    return HEADER_SIZE + c


cdef uint64_t _deadline(timeout) except? 0:
    """Absolute CLOCK_MONOTONIC ns; None waits forever, <= 0 does not wait."""
    if timeout is None:
        return PF_NO_DEADLINE
    cdef double t = timeout
    if not t > 0:          # also NaN
        return PF_NO_WAIT
    return pf_now_ns() + <uint64_t>(min(t, 1e9) * 1e9)


cdef inline int _step(pf_ring *r, int op, uint64_t deadline, uint32_t flags, uint64_t total,
                      const unsigned char *p, uint64_t n) noexcept nogil:
    if op == OP_LOCK:
        return pf_ring_lock(r, deadline)
    if op == OP_WRITE:
        return pf_ring_write_frame(r, flags, total, p, n, deadline)
    return pf_ring_wait_readable(r, deadline)


cdef class _Mapped:
    """A region of someone else's buffer, pinned by a buffer export until close()."""
    cdef Py_buffer _view
    cdef bint _held
    cdef unsigned char *_base
    cdef int _busy              # calls in flight without the GIL: close() must wait
    cdef readonly Py_ssize_t size

    cdef unsigned char *_map(self, buffer, Py_ssize_t offset, Py_ssize_t size, Py_ssize_t align) except NULL:
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        self._held = True
        if offset < 0 or size < 0 or offset > self._view.len - size:
            self.close()
            raise ValueError(f"region [{offset}, {offset}+{size}) is outside a buffer of {self._view.len} bytes")
        cdef unsigned char *p = <unsigned char *>self._view.buf + offset
        if <uintptr_t>p % align:
            self.close()
            raise ValueError(f"region must be {align}-byte aligned (offset {offset})")
        self._base = p
        self.size = size
        return p

    cdef int _check_open(self) except -1:
        if self._base == NULL:
            raise ValueError(f"{type(self).__name__} is closed")
        return 0

    def close(self):
        """Let go of the buffer (the mapping may then be closed)."""
        if self._busy:
            raise RuntimeError(f"{type(self).__name__} is in use by another thread; stop it first")
        self._base = NULL
        if self._held:
            self._held = False
            PyBuffer_Release(&self._view)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._view)


cdef class Ring(_Mapped):
    """A message ring in shared memory: many producers, one consumer.

    Ring(buffer, offset, size, init): `size` bytes of `buffer` at `offset`
    (64-byte aligned) hold the header and the largest power-of-two data area
    that fits; init=True formats them, init=False attaches to a formatted ring.
    Any thread of any process may put(); one thread of one process may get().
    """
    cdef pf_ring r
    cdef object _partial        # bytes being filled by fragments, or None
    cdef uint64_t _filled
    cdef bint _synced           # seen a START: a stray fragment is corruption now
    cdef readonly uint64_t max_message

    def __init__(self, buffer, Py_ssize_t offset, Py_ssize_t size, bint init, *,
                 uint64_t max_message=DEFAULT_MAX_MESSAGE):
        cdef unsigned char *p = self._map(buffer, offset, size, 64)
        rc = pf_ring_init(&self.r, p, size, init)
        if rc != PF_RING_OK:
            self.close()
            if rc == PF_RING_EINVAL:
                raise ValueError(f"a ring needs at least {ring_size(MIN_CAPACITY)} bytes, got {size}")
            raise ValueError("no ring of this size is formatted at this offset (magic, version or capacity differ)")
        self.max_message = max_message

    @property
    def capacity(self):
        """Data bytes (frames included)."""
        return self.r.capacity

    @property
    def used(self):
        """Bytes written and not yet read, frame headers included."""
        cdef uint64_t n
        self._check_open()
        if pf_ring_used(&self.r, &n) != PF_RING_OK:
            raise RingCorruptError(f"ring cursors are {n} bytes apart, capacity {self.r.capacity}")
        return n

    # -- producer side

    def put(self, data, timeout=None):
        """Append one message (any bytes-like object, any length). Waits for
        space; returns False if `timeout` seconds pass first (nothing delivered)."""
        cdef Py_buffer view
        cdef uint64_t deadline = _deadline(timeout)
        self._check_open()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if self._call(OP_LOCK, deadline, 0, 0, NULL, 0) != PF_RING_OK:
                return False
            try:
                return self._write(<const unsigned char *>view.buf, view.len, deadline)
            finally:
                pf_ring_unlock(&self.r)
        finally:
            PyBuffer_Release(&view)

    cdef bint _write(self, const unsigned char *p, uint64_t n, uint64_t deadline) except -1:
        """Under the lock: one frame, or fragments when n exceeds the ring.
        A timeout between fragments leaves a half message that the reader
        drops at the next START."""
        cdef uint64_t chunk = pf_ring_max_fragment(&self.r), done = 0, k
        cdef uint32_t flags
        if n <= self.r.capacity - PF_FRAME_HEADER:
            return self._call(OP_WRITE, deadline, PF_FRAME_START | PF_FRAME_END, n, p, n) == PF_RING_OK
        while done < n:
            k = min(chunk, n - done)
            flags = (PF_FRAME_START if done == 0 else 0) | (PF_FRAME_END if done + k == n else 0)
            if self._call(OP_WRITE, deadline, flags, n, p + done, k) != PF_RING_OK:
                return False
            done += k
        return True

    cdef int _call(self, int op, uint64_t deadline, uint32_t flags, uint64_t total,
                   const unsigned char *p, uint64_t n) except? -100:
        """A blocking C call: one try with the GIL held (dropping and retaking
        the GIL costs more than a put), then waits without the GIL, running
        signal handlers between its slices."""
        cdef int rc = _step(&self.r, op, PF_NO_WAIT, flags, total, p, n)
        if rc == PF_RING_TIMEOUT and deadline != PF_NO_WAIT:
            self._busy += 1
            try:
                while True:
                    with nogil:
                        rc = _step(&self.r, op, deadline, flags, total, p, n)
                    if rc != PF_RING_INTR:
                        break
                    PyErr_CheckSignals()
            finally:
                self._busy -= 1
        if rc == PF_RING_CORRUPT:
            raise RingCorruptError(f"ring cursors are impossible (capacity {self.r.capacity})")
        return rc

    # -- consumer side

    def get(self, timeout=None):
        """The next message, waiting up to `timeout` seconds (None: forever);
        None if none arrived in time."""
        cdef uint64_t deadline = _deadline(timeout)
        while True:
            msg = self._poll()
            if msg is not None:
                return msg
            if self._call(OP_READABLE, deadline, 0, 0, NULL, 0) != PF_RING_OK:
                return None

    def get_all(self, Py_ssize_t max_messages=4096):
        """Up to max_messages complete messages, without waiting."""
        out = []
        while len(out) < max_messages:
            msg = self._poll()
            if msg is None:
                break
            out.append(msg)
        return out

    def wait_readable(self, timeout=None):
        """True once the ring holds a frame (maybe only part of a long message)."""
        self._check_open()
        return self._call(OP_READABLE, _deadline(timeout), 0, 0, NULL, 0) == PF_RING_OK

    cdef object _poll(self):
        """One complete message if the ring holds it, else None."""
        cdef pf_frame f
        self._check_open()
        while True:
            rc = pf_ring_peek(&self.r, &f)
            if rc == PF_RING_EMPTY:
                return None
            if rc != PF_RING_OK:
                raise RingCorruptError(f"bad frame in ring (capacity {self.r.capacity})")
            msg = self._take(&f)
            if msg is not None:
                return msg

    cdef object _take(self, pf_frame *f):
        if f.flags & PF_FRAME_START:
            self._synced = True
            self._partial = None            # its writer died or timed out mid-message
            if f.flags & PF_FRAME_END:
                return self._read_into(f, PyBytes_FromStringAndSize(NULL, f.data_len), 0)
            if f.total > self.max_message or f.total <= f.data_len:
                raise RingCorruptError(f"fragmented message of {f.total} bytes (limit {self.max_message})")
            self._partial = PyBytes_FromStringAndSize(NULL, f.total)
            self._filled = 0
        elif self._partial is None:
            if self._synced:
                raise RingCorruptError("message fragment without a start")
            pf_ring_consume(&self.r, f)     # we attached mid-message: skip its tail
            return None
        if self._filled + f.data_len > <uint64_t>len(self._partial):
            raise RingCorruptError("fragments overrun their message")
        self._read_into(f, self._partial, self._filled)
        self._filled += f.data_len
        if not f.flags & PF_FRAME_END:
            return None
        if self._filled != <uint64_t>len(self._partial):
            raise RingCorruptError("message ended before its stated length")
        msg, self._partial = self._partial, None
        return msg

    cdef object _read_into(self, pf_frame *f, bytes dst, uint64_t at):
        """Copy the frame's data into dst (not yet shared) at `at`; consume it."""
        cdef char *p = PyBytes_AS_STRING(dst) + at
        if f.data_len < NOGIL_COPY:
            pf_ring_read(&self.r, f, p)
            pf_ring_consume(&self.r, f)
            return dst
        self._busy += 1
        with nogil:
            pf_ring_read(&self.r, f, p)
            pf_ring_consume(&self.r, f)
        self._busy -= 1
        return dst


cdef class SharedWords(_Mapped):
    """Atomic 32/64-bit words in `size` bytes of `buffer` at `offset`,
    addressed by byte offset within the region (aligned to the word size)."""

    def __init__(self, buffer, Py_ssize_t offset, Py_ssize_t size):
        self._map(buffer, offset, size, 8)

    cdef void *_at(self, Py_ssize_t off, Py_ssize_t width) except NULL:
        self._check_open()
        if off < 0 or off > self.size - width or off % width:
            raise ValueError(f"word offset {off} is out of range or misaligned (width {width}, size {self.size})")
        return self._base + off

    def load_u32(self, Py_ssize_t off):
        return pf_shm_load_u32(self._at(off, 4))

    def store_u32(self, Py_ssize_t off, uint32_t value):
        pf_shm_store_u32(self._at(off, 4), value)

    def cas_u32(self, Py_ssize_t off, uint32_t expected, uint32_t desired):
        """Set the word to desired if it holds expected; True if it did."""
        return bool(pf_shm_cas_u32(self._at(off, 4), expected, desired))

    def load_i64(self, Py_ssize_t off):
        return pf_shm_load_i64(self._at(off, 8))

    def store_i64(self, Py_ssize_t off, int64_t value):
        pf_shm_store_i64(self._at(off, 8), value)

    def add_i64(self, Py_ssize_t off, int64_t value):
        """Atomically add; returns the new value."""
        return pf_shm_add_i64(self._at(off, 8), value)

    def load_f64(self, Py_ssize_t off):
        return pf_shm_load_f64(self._at(off, 8))

    def store_f64(self, Py_ssize_t off, double value):
        pf_shm_store_f64(self._at(off, 8), value)

    def add_f64(self, Py_ssize_t off, double value):
        """Atomically add; returns the new value."""
        return pf_shm_add_f64(self._at(off, 8), value)
