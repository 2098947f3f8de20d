"""The shared-memory segment across real processes."""
import multiprocessing as mp
import os
import secrets
import signal
import threading

import pytest

from pyforge.engine.config import MAX_EOS_IDS, EngineFacts
from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc.records import Submit, decode, encode
from pyforge.ipc.segment import SHM_DIR, EngineStatus, Segment, _open_shm, _unlink, cleanup_stale, new_name

FORK = mp.get_context("fork")
SMALL = {"request_ring_bytes": 1 << 14, "response_ring_bytes": 1 << 12}


@pytest.fixture
def prefix():
    """A name prefix of this test's own, so cleanup never touches real segments."""
    p = f"pyforge-test{secrets.token_hex(3)}-"
    yield p
    for name in os.listdir(SHM_DIR):
        if name.startswith(p):
            _unlink(name)


@pytest.fixture
def segment(prefix):
    seg = Segment.create(new_name(prefix), n_workers=2, **SMALL)
    yield seg
    seg.close()


def run(target, *args):
    """Run target in a forked child; return its exit code."""
    p = FORK.Process(target=target, args=args)
    p.start()
    p.join(10)
    return p.exitcode


# -- children ----------------------------------------------------------------

def engine_child(name):
    with Segment.attach(name) as seg:
        assert seg.layout.n_workers == 2
        seg.engine_pid = os.getpid()
        seg.engine_status = EngineStatus.READY
        seg.beat()
        seg.set("kv_cache_usage_perc", 0.25)
        seg.add("prompt_tokens", 40)
        record = decode(seg.request_ring.get(timeout=5))
        seg.response_ring(record.worker).put(encode(record), timeout=5)


def worker_child(name, requests):
    with Segment.attach(name) as seg:
        seg.claim_slot()
        for _ in range(requests):
            seg.add("requests")
            seg.add("request_success")
        seg.observe("time_to_first_token_seconds", 0.03)
        seg.observe("time_to_first_token_seconds", 1e6)         # lands in +Inf
        assert seg.stats()["kv_cache_usage_perc"] == 0.5        # the engine's gauge, read here


def claim_and_hang(name, ready):
    seg = Segment.attach(name)
    seg.claim_slot()
    ready.set()
    threading.Event().wait(30)


def create_and_die(prefix, conn):
    seg = Segment.create(new_name(prefix), n_workers=1, **SMALL)
    conn.send(seg.name)
    os._exit(0)                                                 # no close, no unlink


# -- tests -------------------------------------------------------------------

def test_engine_in_another_process(segment):
    assert segment.engine_status == EngineStatus.STARTING
    slot = segment.claim_slot()
    segment.request_ring.put(encode(Submit(next(segment.request_ids()), slot, [1, 2, 3], SamplingParams(max_tokens=4))))
    assert run(engine_child, segment.name) == 0
    assert segment.engine_status == EngineStatus.READY and segment.engine_pid > 0
    assert segment.heartbeat == 1
    echoed = decode(segment.response_ring(slot).get(timeout=5))
    assert echoed.prompt_ids == [1, 2, 3] and echoed.worker == slot
    stats = segment.stats()
    assert stats["kv_cache_usage_perc"] == 0.25 and stats["prompt_tokens"] == 40


def test_worker_stats_from_other_processes(segment):
    segment.set("kv_cache_usage_perc", 0.5)
    assert run(worker_child, segment.name, 3) == 0
    assert run(worker_child, segment.name, 4) == 0
    stats = segment.stats()
    assert stats["requests"] == 7 and stats["request_success"] == 7 and stats["request_failure"] == 0
    ttft = stats["time_to_first_token_seconds"]
    assert ttft["count"] == 4 and ttft["sum"] == pytest.approx(2 * (0.03 + 1e6))
    assert ttft["counts"][ttft["buckets"].index(0.04)] == 2 and ttft["counts"][-1] == 2
    assert segment.slot_pid(0) == segment.slot_pid(1) == 0          # both released on close


def test_slot_claim_and_release(segment):
    other = Segment.attach(segment.name)
    try:
        assert {segment.claim_slot(), other.claim_slot()} == {0, 1}
        with Segment.attach(segment.name) as third, pytest.raises(RuntimeError, match="live"):
            third.claim_slot()
        held = other.slot
        other.release_slot()
        assert other.slot is None and segment.slot_pid(held) == 0
        assert other.claim_slot() == held and segment.slot_pid(held) == os.getpid()
    finally:
        other.close()


def test_slot_of_a_killed_worker_is_reclaimed(prefix):
    with Segment.create(new_name(prefix), n_workers=1, **SMALL) as seg:
        ready = FORK.Event()
        child = FORK.Process(target=claim_and_hang, args=(seg.name, ready))
        child.start()
        assert ready.wait(10) and seg.slot_pid(0) == child.pid
        with pytest.raises(RuntimeError):
            seg.claim_slot()                                    # its owner still lives
        seg.response_ring(0).put(b"reply for the dead worker")
        first_id = 1 << 32                                      # slot 0, first claim
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
        assert seg.claim_slot() == 0 and seg.slot_pid(0) == os.getpid()
        assert seg.response_ring(0).get(timeout=0) is None      # stale replies dropped
        assert next(seg.request_ids()) != first_id              # fresh id range


def test_stat_writes_are_atomic_across_threads(segment):
    segment.claim_slot()

    def bump():
        for _ in range(2000):
            segment.add("requests")
            segment.observe("inter_token_latency_seconds", 0.02)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = segment.stats(slot=segment.slot)
    assert stats["requests"] == 8000
    assert stats["inter_token_latency_seconds"]["count"] == 8000
    assert stats["inter_token_latency_seconds"]["sum"] == pytest.approx(160.0)


def test_stat_api_checks_names_and_kinds(segment):
    with pytest.raises(KeyError):
        segment.add("no_such_stat")
    with pytest.raises(ValueError):
        segment.add("kv_cache_usage_perc")                      # a gauge
    with pytest.raises(RuntimeError, match="slot"):
        segment.add("requests")                                 # a worker stat, no slot held


def test_unlink_leaves_nothing_behind(prefix):
    seg = Segment.create(new_name(prefix), n_workers=3, **SMALL)
    path = os.path.join(SHM_DIR, seg.name)
    other = Segment.attach(seg.name)
    other.claim_slot()
    assert os.path.exists(path)
    other.close()
    seg.close()
    seg.unlink()
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        Segment.attach(seg.name)


def test_attach_refuses_foreign_memory(prefix):
    shm = _open_shm(new_name(prefix), create=True, size=8192)
    try:
        with pytest.raises(ValueError, match="not a pyforge segment"):
            Segment.attach(shm.name)
    finally:
        shm.close()


def test_cleanup_stale_removes_only_dead_creators(prefix, segment):
    parent, child = FORK.Pipe()
    assert run(create_and_die, prefix, child) == 0
    dead = parent.recv()
    assert os.path.exists(os.path.join(SHM_DIR, dead))
    assert cleanup_stale(prefix) == [dead]
    assert not os.path.exists(os.path.join(SHM_DIR, dead))
    assert os.path.exists(os.path.join(SHM_DIR, segment.name))  # ours: creator alive


def test_the_engine_publishes_its_facts(prefix):
    facts = EngineFacts(4096, 32000, frozenset({2, 32000 - 1, 7}), 2048)
    with Segment.create(new_name(prefix), n_workers=1) as seg:
        try:
            seg.publish_facts(facts)
            with Segment.attach(seg.name) as other:
                assert other.facts == facts
        finally:
            seg.unlink()


def test_the_segment_has_room_for_the_eos_ids_it_accepts():
    EngineFacts(4096, 32000, frozenset(range(MAX_EOS_IDS)))
    with pytest.raises(ValueError, match="room for 32"):
        EngineFacts(4096, 32000, frozenset(range(MAX_EOS_IDS + 1)))
