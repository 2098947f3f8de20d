"""The native ring across real processes over POSIX shared memory."""
import contextlib
import multiprocessing as mp
import os
import random
import signal
import struct
import threading
import time

import pytest

from pyforge.ipc.segment import _open_shm, _unlink, new_name
from pyforge.native.ipc import HEADER_SIZE, Ring, RingCorruptError, ring_size

FORK = mp.get_context("fork")
LOCK_OFFSET, TAIL_OFFSET, HEAD_OFFSET = 16, 64, 128     # pf_ring_header in shm_ring.h


@pytest.fixture
def make_ring():
    """make_ring(capacity) -> (shm name, Ring formatted over fresh /dev/shm memory,
    the raw buffer to scribble on)."""
    made = []

    def make(capacity, **kw):
        shm = _open_shm(new_name("pyforge-test-"), create=True, size=ring_size(capacity))
        ring = Ring(shm.buf, 0, shm.size, True, **kw)
        made.append((shm, ring))
        return shm.name, ring, shm.buf

    yield make
    for shm, ring in made:
        ring.close()
        shm.close()
        _unlink(shm.name)


@contextlib.contextmanager
def attached(name, **kw):
    """The ring in shm `name`, mapped afresh (as another process would)."""
    shm = _open_shm(name)
    ring = Ring(shm.buf, 0, shm.size, False, **kw)
    try:
        yield ring
    finally:
        ring.close()
        shm.close()


def message(seed, i, size):
    return random.Random(seed * 1_000_003 + i).randbytes(size)


def start(target, *args):
    p = FORK.Process(target=target, args=args)
    p.start()
    return p


def join_ok(p, timeout=10):
    p.join(timeout)
    assert p.exitcode == 0, f"child exit code {p.exitcode}"


# -- children ----------------------------------------------------------------

def write_messages(name, seed, sizes):
    with attached(name) as ring:
        for i, n in enumerate(sizes):
            assert ring.put(message(seed, i, n), timeout=10)


def write_numbered(name, writer, count):
    with attached(name) as ring:
        for seq in range(count):
            assert ring.put(struct.pack("<HI", writer, seq) + bytes(seq % 61), timeout=10)


def read_messages(name, seed, sizes):
    with attached(name) as ring:
        for i, n in enumerate(sizes):
            assert ring.get(timeout=10) == message(seed, i, n), f"message {i}"


def read_until_interrupted(name):
    with attached(name) as ring:
        try:
            ring.get()
        except KeyboardInterrupt:
            os._exit(7)


# -- tests -------------------------------------------------------------------

def test_sizes_wraparound_and_giant_messages_cross_processes(make_ring):
    name, ring, _ = make_ring(1024)
    edge = [0, 1, 7, 8, 9, 1007, 1008, 1009, 1015, 1016, 1017, 1024, 2048, 10 * 1024, 10 * 1024 + 3]
    sizes = edge + [random.Random(i).randrange(0, 700) for i in range(300)] + edge
    writer = start(write_messages, name, 1, sizes)
    for i, n in enumerate(sizes):
        assert ring.get(timeout=10) == message(1, i, n), f"message {i} ({n} bytes)"
    join_ok(writer)
    assert ring.used == 0


def test_four_writer_processes_each_message_once_in_order(make_ring):
    name, ring, _ = make_ring(4096)
    writers = [start(write_numbered, name, w, 2000) for w in range(4)]
    next_seq = [0] * 4
    deadline = time.monotonic() + 15
    while sum(next_seq) < 8000 and time.monotonic() < deadline:
        ring.wait_readable(timeout=1)
        for msg in ring.get_all(256):
            writer, seq = struct.unpack_from("<HI", msg)
            assert seq == next_seq[writer], f"writer {writer}: got {seq}, expected {next_seq[writer]}"
            assert msg[6:] == bytes(seq % 61)
            next_seq[writer] += 1
    assert next_seq == [2000] * 4
    for w in writers:
        join_ok(w)
    assert ring.get_all(10) == [] and ring.used == 0


def test_writer_threads_share_one_ring_object(make_ring):
    _, ring, _ = make_ring(1024)

    def write(writer):
        for seq in range(1000):
            assert ring.put(struct.pack("<HI", writer, seq) + bytes(seq % 300), timeout=10)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    next_seq = [0] * 4
    for _ in range(4000):
        writer, seq = struct.unpack_from("<HI", ring.get(timeout=10))
        assert seq == next_seq[writer]
        next_seq[writer] += 1
    for t in threads:
        t.join()


def test_single_producer_single_consumer_across_processes(make_ring):
    name, ring, _ = make_ring(2048)
    sizes = [random.Random(7 + i).choice([0, 64, 300, 2040, 5000]) for i in range(2000)]
    reader = start(read_messages, name, 3, sizes)
    for i, n in enumerate(sizes):
        assert ring.put(message(3, i, n), timeout=10)
    join_ok(reader)


def test_idle_get_times_out_without_spinning(make_ring):
    _, ring, _ = make_ring(1024)
    wall, cpu = time.monotonic(), time.process_time()
    assert ring.get(timeout=0.5) is None
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    assert 0.45 <= wall < 2.0
    assert cpu < 0.2 * 0.5, f"{cpu:.3f} s of CPU in a {wall:.3f} s wait"
    assert not ring.wait_readable(timeout=0.05)
    assert ring.get(timeout=0) is None and ring.get_all(5) == []


def test_blocked_writer_proceeds_when_reader_drains(make_ring):
    name, ring, _ = make_ring(1024)
    sizes = [200] * 20                                  # 20 frames of 208 bytes: 4x the ring
    writer = start(write_messages, name, 5, sizes)
    deadline = time.monotonic() + 5
    while ring.used < 1024 - 208 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert writer.is_alive(), "the writer should be waiting for space"
    assert ring.used == 4 * 208
    for i, n in enumerate(sizes):
        assert ring.get(timeout=5) == message(5, i, n)
    join_ok(writer)


def test_put_times_out_on_a_full_ring(make_ring):
    _, ring, _ = make_ring(1024)
    while ring.put(b"x" * 100, timeout=0):
        pass
    wall, cpu = time.monotonic(), time.process_time()
    assert ring.put(b"y" * 100, timeout=0.3) is False
    assert time.monotonic() - wall >= 0.25 and time.process_time() - cpu < 0.1
    assert ring.get(timeout=0) == b"x" * 100        # the failed put left nothing behind


def test_dead_writer_does_not_wedge_the_ring(make_ring):
    name, ring, _ = make_ring(1024)
    writer = start(write_messages, name, 9, [20_000])    # blocks holding the lock mid-message
    deadline = time.monotonic() + 5
    while ring.used <= 512 and time.monotonic() < deadline:     # two fragments in: it waits
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(5)                                      # reaped: its pid is gone
    assert ring.get(timeout=0) is None                  # drains the half message
    assert ring.put(b"after", timeout=2)                # takes the dead writer's lock
    assert ring.get(timeout=2) == b"after"              # the half message is dropped


def test_signal_interrupts_an_endless_wait(make_ring):
    name, _, _ = make_ring(1024)
    reader = start(read_until_interrupted, name)
    time.sleep(0.3)
    os.kill(reader.pid, signal.SIGINT)
    reader.join(5)
    assert reader.exitcode == 7


def test_garbage_cursors_raise(make_ring):
    _, ring, raw = make_ring(1024)
    struct.pack_into("<Q", raw, TAIL_OFFSET, 1 << 40)
    for call in (lambda: ring.used, lambda: ring.get(timeout=0), lambda: ring.put(b"x", timeout=0)):
        with pytest.raises(RingCorruptError):
            call()


def test_garbage_frame_raises(make_ring):
    _, ring, raw = make_ring(1024)
    ring.put(b"hello")
    struct.pack_into("<I", raw, HEADER_SIZE, 900)           # length beyond what was written
    with pytest.raises(RingCorruptError):
        ring.get(timeout=0)


def test_oversized_fragmented_message_is_refused(make_ring):
    name, ring, _ = make_ring(1024)
    writer = threading.Thread(target=ring.put, args=(bytes(5000), 0.5))
    writer.start()
    with attached(name, max_message=4096) as reader, pytest.raises(RingCorruptError):
        reader.get(timeout=2)
    writer.join()


def test_random_garbage_never_crashes(make_ring):
    _, ring, raw = make_ring(256)
    rng = random.Random(0)
    for _ in range(300):
        Ring(raw, 0, len(raw), True).close()                     # reformat
        for _ in range(rng.randrange(4)):
            ring.put(rng.randbytes(rng.randrange(100)), timeout=0)
        for _ in range(rng.randrange(1, 6)):                     # lock, tail, head, or data
            at = rng.choice([LOCK_OFFSET, TAIL_OFFSET, HEAD_OFFSET, rng.randrange(HEADER_SIZE, len(raw) - 8)])
            raw[at:at + 8] = rng.randbytes(8)
        for call in (lambda: ring.get_all(8), lambda: ring.put(b"z" * 50, timeout=0), lambda: ring.used):
            try:
                call()
            except RingCorruptError:
                pass


def test_region_checks(make_ring):
    _, _, raw = make_ring(1024)
    assert Ring(raw, 0, ring_size(1024), False).capacity == 1024
    with pytest.raises(ValueError):
        Ring(raw, 64, ring_size(512), False)             # nothing formatted there
    with pytest.raises(ValueError):
        Ring(raw, 8, 512, True)                          # misaligned
    with pytest.raises(ValueError):
        Ring(raw, 0, len(raw) + 64, True)                # outside the buffer
    with pytest.raises(ValueError):
        ring_size(1000)
    with pytest.raises(BufferError):
        Ring(b"\0" * 4096, 0, 4096, True)                 # read-only memory


def test_ring_in_use_by_a_waiting_thread_refuses_to_close(make_ring):
    _, ring, _ = make_ring(1024)
    reader = threading.Thread(target=ring.get, args=(1.0,))
    reader.start()
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="in use"):
        ring.close()
    ring.put(b"wake up")
    reader.join()
    ring.close()


def test_closed_ring_refuses_use_and_pins_its_buffer(make_ring):
    name, _, _ = make_ring(1024)
    shm = _open_shm(name)
    ring = Ring(shm.buf, 0, shm.size, False)
    with pytest.raises(BufferError):
        shm.close()                                      # the ring still uses the mapping
    ring.close()
    shm.close()
    with pytest.raises(ValueError):
        ring.get(timeout=0)
    with pytest.raises(ValueError):
        ring.put(b"x")
