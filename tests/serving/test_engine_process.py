"""The engine process behind the shared-memory segment, with real processes."""
import dataclasses
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, drain_stream, fail_next_run
from pyforge.engine.config import EngineFacts
from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc.segment import SHM_DIR, EngineStatus, Segment, new_name
from pyforge.server.engine_client import ADMITTED, ErrorEvent, FinishEvent, QueueFullError, TokenEvent
from pyforge.server.ipc_client import IpcEngineClient
from pyforge.serving.engine_process import run_engine

SPAWN = mp.get_context("spawn")     # the test process runs an Engine (OpenMP): never fork after that
SMALL = {"request_ring_bytes": 1 << 16, "response_ring_bytes": 1 << 16}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 450, 4996, 17354 + i, 1701 + 3 * i] for i in range(16)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from pyforge.synthetic import write_gguf
    path = tmp_path_factory.mktemp("model") / "tiny-gqa.gguf"
    write_gguf("tiny-gqa", path, "F32")
    return str(path)


def engine_kwargs(model_path, **kw):
    return {"model_path": model_path, "n_threads": 1, "max_model_len": 256, "kv_cache_tokens": 2048,
            "block_size": 16, "max_num_seqs": 32, **kw}


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy tokens of every prompt from the in-process engine."""
    from pyforge.engine.config import EngineConfig
    from pyforge.engine.engine import Engine
    engine = Engine(EngineConfig(**engine_kwargs(model_path)))
    return [[out.token_id for out in engine.generate(p, GREEDY)] for p in PROMPTS]


class Running:
    """A segment plus an engine process; torn down with checks that nothing is left."""

    def __init__(self, model_path, n_workers=4, queue_capacity=64, **kw):
        self.seg = Segment.create(new_name(f"pyforge-test{secrets.token_hex(3)}-"), n_workers=n_workers, **SMALL)
        self.proc = SPAWN.Process(target=run_engine, args=(self.seg.name, engine_kwargs(model_path, **kw),
                                                           queue_capacity, 10.0, "WARNING"))
        self.proc.start()
        deadline = time.monotonic() + 60
        while self.seg.engine_status != EngineStatus.READY:
            assert self.proc.is_alive(), "the engine died while loading"
            assert time.monotonic() < deadline, "the engine did not get ready"
            time.sleep(0.02)
        self.clients = []

    def client(self, **kw):
        """A client on its own mapping (a slot per Segment object, as per worker process)."""
        c = IpcEngineClient(Segment.attach(self.seg.name), **kw)
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()
            c.seg.close()
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(20)
        assert self.proc.exitcode is not None
        name = self.seg.name
        self.seg.close()
        self.seg.unlink()
        assert not os.path.exists(os.path.join(SHM_DIR, name))


@pytest.fixture
def running(model_path):
    r = Running(model_path)
    yield r
    r.close()


def test_greedy_tokens_through_ipc_equal_in_process(running, reference):
    client = running.client()
    assert client.ready()
    streams = [client.submit(p, GREEDY) for p in PROMPTS[:4]]
    for i, stream in enumerate(streams):
        tokens, last = drain_stream(stream)
        assert tokens == reference[i]
        assert last == FinishEvent("length", len(PROMPTS[i]), 12, last.cached_tokens)
    stats = running.seg.stats()
    assert stats["generation_tokens"] == 48 and stats["prompt_tokens"] == sum(map(len, PROMPTS[:4]))


def test_logprobs_travel(running):
    stream = running.client().submit(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2, logprobs=3))
    admitted, *events = list(stream)
    assert admitted is ADMITTED
    # tokens a slow reader finds waiting come as one event: count per token, not per event
    assert all(len(e.logprobs) == len(e.top_logprobs) == len(e.token_ids) for e in events[:-1])
    assert sum(len(e.token_ids) for e in events[:-1]) == 2
    assert all(len(row) == 3 for e in events[:-1] for row in e.top_logprobs)
    assert isinstance(events[-1], FinishEvent)


def _client_process(name, indices, out):
    seg = Segment.attach(name)
    client = IpcEngineClient(seg)
    streams = {i: client.submit(PROMPTS[i], GREEDY) for i in indices}
    out.put({i: drain_stream(s)[0] for i, s in streams.items()})
    client.close()
    seg.close()


def test_sixteen_concurrent_requests_from_two_processes(running, reference):
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_client_process, args=(running.seg.name, range(k, 16, 2), out)) for k in (0, 1)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        results.update(out.get(timeout=60))
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert results == dict(enumerate(reference))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_abort_frees_blocks(running):
    client = running.client()
    stream = client.submit(PROMPTS[0] * 8, SamplingParams(max_tokens=200, ignore_eos=True))
    events = iter(stream)
    assert next(events) is ADMITTED
    assert isinstance(next(events), TokenEvent)
    wait_for(lambda: client.stats()["kv_usage"] > 0)
    stream.abort()
    assert drain_stream(events)[1].finish_reason == "abort"
    wait_for(lambda: client.stats()["kv_usage"] == 0 and client.stats()["running"] == 0)


def test_bad_prompt_is_a_400_error_event(running):
    client = running.client()
    with pytest.raises(ValueError, match="vocabulary"):
        client.submit([1, 10 ** 6], GREEDY)     # the worker checks against the engine's facts
    client.facts = dataclasses.replace(client.facts, vocab_size=2 ** 31)    # a worker that believes otherwise:
    _, last = drain_stream(client.submit([1, 10 ** 6], GREEDY))              # the engine itself refuses
    assert isinstance(last, ErrorEvent) and last.status == 400 and "vocabulary" in last.message
    _, last = drain_stream(client.submit([1, 2], SamplingParams(max_tokens=2)))
    assert isinstance(last, FinishEvent)           # the engine carries on
    with pytest.raises(ValueError):
        client.submit([], GREEDY)
    with pytest.raises(ValueError):
        client.submit([1] * 256, GREEDY)


def test_a_failed_step_fails_only_its_requests(model_path):
    """The engine loop in this process, over a real segment: a step that runs out of memory
    ends its own two requests with a 503; the third, waiting, generates as if nothing happened."""
    from pyforge.engine.config import EngineConfig
    from pyforge.engine.engine import Engine
    from pyforge.serving.engine_process import EngineLoop

    engine = Engine(EngineConfig(**engine_kwargs(model_path, max_num_seqs=2)))
    expected = [out.token_id for out in engine.generate(PROMPTS[2], GREEDY)]
    seg = Segment.create(new_name(f"pyforge-test{secrets.token_hex(3)}-"), n_workers=1, **SMALL)
    seg.publish_facts(engine.facts)     # as run_engine does
    client = IpcEngineClient(Segment.attach(seg.name))
    try:
        loop = EngineLoop(seg, engine)
        seg.engine_pid, seg.engine_status = os.getpid(), EngineStatus.READY
        streams = [client.submit(p, GREEDY) for p in PROMPTS[:3]]
        while len(loop.requests) < 3:
            loop.drain_ring()
        fail_next_run(engine, MemoryError("injected"))
        while loop.requests:
            loop.run_once()
        results = [drain_stream(s) for s in streams]
    finally:
        client.close()
        client.seg.close()
        seg.close()
        seg.unlink()
    for tokens, last in results[:2]:
        assert tokens == [] and isinstance(last, ErrorEvent) and last.status == 503, last
    assert results[2] == (expected, FinishEvent("length", len(PROMPTS[2]), 12, results[2][1].cached_tokens))
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_full_queue_is_a_503(model_path):
    r = Running(model_path, queue_capacity=1, max_num_seqs=1)
    try:
        client = r.client()
        long = SamplingParams(max_tokens=40, ignore_eos=True)
        streams, rejected_at_submit = [], 0
        for i in range(4):
            try:   # the client may already see the engine's waiting gauge at capacity
                streams.append(client.submit(PROMPTS[i], long))
            except QueueFullError:
                rejected_at_submit += 1
        finals = [drain_stream(s)[1] for s in streams]
        engine_503s = sum(isinstance(f, ErrorEvent) and f.status == 503 for f in finals)
        assert rejected_at_submit + engine_503s >= 2     # one runs, one waits, the rest are refused
        assert isinstance(finals[0], FinishEvent)
    finally:
        r.close()


def generating(client, max_tokens):
    """The events of a request already admitted and generating (its first token read)."""
    events = iter(client.submit(PROMPTS[0], SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    assert next(events) is ADMITTED
    assert isinstance(next(events), TokenEvent)
    return events


def test_killed_engine_ends_streams_with_an_error(model_path):
    r = Running(model_path)
    try:
        client = r.client()
        events = generating(client, 200)
        os.kill(r.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, last = drain_stream(events)
        assert isinstance(last, ErrorEvent) and last.status == 503
        assert time.monotonic() - t0 < 5
        assert not client.ready()
        with pytest.raises(QueueFullError):
            client.submit(PROMPTS[0], GREEDY)
    finally:
        r.close()


def test_sigterm_drains_running_requests(model_path):
    r = Running(model_path)
    try:
        client = r.client()
        events = generating(client, 60)
        os.kill(r.proc.pid, signal.SIGTERM)
        wait_for(lambda: r.seg.engine_status != EngineStatus.READY)
        assert not client.ready()
        tokens, last = drain_stream(events)
        assert last == FinishEvent("length", len(PROMPTS[0]), 60, last.cached_tokens)
        r.proc.join(10)
        assert r.proc.exitcode == 0 and r.seg.engine_status == EngineStatus.STOPPED
    finally:
        r.close()


def test_submits_the_engine_cannot_take_are_answered_400(model_path):
    """A SUBMIT of another build's layout, or one carrying extensions this engine does
    not know, is answered (its client must not wait), not dropped or half-honoured."""
    from pyforge.engine.config import EngineConfig
    from pyforge.engine.engine import Engine
    from pyforge.engine.errors import ErrorKind
    from pyforge.ipc.records import HEADER, Error, RecordType, Submit, decode_batch, encode
    from pyforge.serving.engine_process import EngineLoop

    engine = Engine(EngineConfig(**engine_kwargs(model_path)))
    seg = Segment.create(new_name(f"pyforge-test{secrets.token_hex(3)}-"), n_workers=1, **SMALL)
    worker = Segment.attach(seg.name)
    try:
        slot = worker.claim_slot()
        loop = EngineLoop(seg, engine)
        seg.request_ring.put(HEADER.pack(RecordType.SUBMIT, 0, slot, 7) + struct.pack("<IHH", 1, 99, 0))
        seg.request_ring.put(encode(Submit(8, slot, [1, 2], GREEDY, extensions=b"\x01")))
        loop.run_once()
        replies = [r for m in worker.response_ring(slot).get_all() for r in decode_batch(m)]
    finally:
        worker.close()
        seg.close()
        seg.unlink()
    assert [(r.request_id, r.kind) for r in replies] == [(7, ErrorKind.BAD_REQUEST), (8, ErrorKind.BAD_REQUEST)]
    assert all(isinstance(r, Error) for r in replies)
    assert "version 99" in replies[0].message and "extensions" in replies[1].message
    assert not engine.has_work


def test_a_c_client_talks_to_the_engine_with_the_c_header(running, reference, tmp_path):
    """native/pyforge_ipc.h is the whole contract: a C program built from it (and the
    ring, native/shm_ring.c) attaches to a live engine, submits, and reads the same
    greedy tokens the in-process engine makes."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    exe = tmp_path / "c_client"
    subprocess.run([gcc, "-O1", "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(REPO / "native"),
                    str(Path(__file__).with_name("c_client.c")), str(REPO / "native" / "shm_ring.c"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(exe), running.seg.name, "12", *map(str, PROMPTS[0])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    facts, *lines = out.stdout.split("\n")
    max_model_len, vocab_size, hidden_size, *eos_ids = map(int, facts.split()[1:])
    assert EngineFacts(max_model_len, vocab_size, frozenset(eos_ids), hidden_size) == running.seg.facts
    assert max_model_len == 256 and eos_ids and hidden_size > 0
    assert lines[0] == "admitted"
    assert [int(line.split()[1]) for line in lines if line.startswith("token ")] == reference[0]
    assert f"finish length {len(PROMPTS[0])} 12" in lines
    assert all(running.seg.slot_pid(s) == 0 for s in range(4))      # it gave its slot back


def test_admission_is_sent_before_the_prefill_step(model_path):
    """A stream opens (status line, SSE keep-alives) while its prompt's prefill runs: the
    ADMITTED record is on the worker's ring when the step's forward pass begins, not sent
    with the step's first token."""
    from pyforge.engine.config import EngineConfig
    from pyforge.engine.engine import Engine
    from pyforge.ipc.records import Admitted, Submit, decode_batch, encode
    from pyforge.serving.engine_process import EngineLoop

    engine = Engine(EngineConfig(**engine_kwargs(model_path)))
    seg = Segment.create(new_name(f"pyforge-test{secrets.token_hex(3)}-"), n_workers=1, **SMALL)
    worker = Segment.attach(seg.name)
    try:
        slot = worker.claim_slot()
        loop = EngineLoop(seg, engine)

        def received():
            return [r for m in worker.response_ring(slot).get_all() for r in decode_batch(m)]
        during_prefill = []
        real = engine.runner.forward

        def forward(*args, **kwargs):
            engine.runner.forward = real
            during_prefill.extend(received())
            return real(*args, **kwargs)
        engine.runner.forward = forward
        seg.request_ring.put(encode(Submit(7, slot, PROMPTS[0], GREEDY)))
        loop.run_once()
        after = received()
        loop.table.abort(7)
        loop.replies.flush()
    finally:
        worker.close()
        seg.close()
        seg.unlink()
    assert [(type(r), r.request_id) for r in during_prefill] == [(Admitted, 7)]
    assert after and not any(isinstance(r, Admitted) for r in after) and after[0].request_id == 7


def test_speculative_decoding_through_ipc_keeps_the_tokens_and_counts_drafts(model_path):
    """Several tokens a step cross the rings as they would one by one; the opt-out travels;
    the spec_decode counters and acceptance histogram reach the segment."""
    from pyforge.engine.config import EngineConfig
    from pyforge.engine.engine import Engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    loop_prompt = [1] + [450, 4996, 17354, 29889] * 5      # the random model's greedy output loops on it
    plain = Engine(EngineConfig(**engine_kwargs(model_path)))
    expected = [out.token_id for out in plain.generate(loop_prompt, params)]
    r = Running(model_path, speculative_config={"method": "ngram", "disable_by_batch_size": 4})
    try:
        client = r.client()
        opted_out = drain_stream(client.submit(loop_prompt, dataclasses.replace(params, max_drafts=0)))
        assert opted_out[0] == expected and r.seg.stats()["spec_decode_num_drafts"] == 0
        tokens, last = drain_stream(client.submit(loop_prompt, params))
        assert tokens == expected and last.completion_tokens == 40
        stats = r.seg.stats()
        assert stats["spec_decode_num_accepted_tokens"] > 0
        assert stats["spec_decode_num_draft_tokens"] >= stats["spec_decode_num_accepted_tokens"]
        histogram = stats["spec_decode_acceptance_length"]
        assert histogram["count"] == stats["spec_decode_num_drafts"]
        assert histogram["sum"] == stats["spec_decode_num_accepted_tokens"]
    finally:
        r.close()
