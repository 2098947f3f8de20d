"""RingReplies with and without the step core's own publishing (step_core.publish_plain):
the records every worker slot decodes are the same, message by message."""
import os
import random

import pytest

from pyforge.engine.config import EngineConfig
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc import Finish, Tokens, decode_batch
from pyforge.ipc.segment import Segment, new_name
from pyforge.native import step_core
from pyforge.serving.engine_process import EngineLoop, _Worker

N_SLOTS = 3


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from pyforge.synthetic import write_gguf
    path = tmp_path_factory.mktemp("model") / "tiny-gqa.gguf"
    write_gguf("tiny-gqa", path, "F32")
    return str(path)


def random_params(rng):
    """Mostly plain requests; some ask for logprobs or prompt logprobs, some are embeddings."""
    kind = rng.choice(["plain"] * 6 + ["logprobs", "prompt_logprobs", "embedding"])
    if kind == "embedding":
        return SamplingParams(max_tokens=1, pooling="last")
    return SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 32),
                          max_tokens=rng.randint(1, 9), stop_token_ids=tuple(rng.sample(range(300), 40)),
                          logprobs=2 if kind == "logprobs" else None,
                          prompt_logprobs=1 if kind == "prompt_logprobs" else None)


def random_trace(seed, n_steps=14):
    """Per step: the requests submitted before it (request id, slot, prompt, params) and
    the request ids aborted before it."""
    rng = random.Random(seed)
    trace, next_id, live = [], 1, []
    for _ in range(n_steps):
        arrivals = []
        for _ in range(rng.randint(0, 5)):
            prompt = [rng.randrange(1, 300) for _ in range(rng.randint(1, 40))]
            arrivals.append((next_id, rng.randrange(N_SLOTS), prompt, random_params(rng)))
            live.append(next_id)
            next_id += 1
        # a recent request, likely still running (one already finished: the abort does nothing)
        aborts = [live.pop(-rng.randint(1, min(4, len(live))))] if live and rng.random() < 0.4 else []
        trace.append((arrivals, aborts))
    return trace


def run_trace(model_path, trace, native_plain):
    """Every slot's response-ring messages, decoded, over the trace."""
    engine = Engine(EngineConfig(model_path, n_threads=1, max_model_len=128, kv_cache_tokens=1024,
                                 block_size=16, max_num_seqs=8))
    seg = Segment.create(new_name("pyforge-test-replies-"), n_workers=N_SLOTS)
    try:
        loop = EngineLoop(seg, engine, queue_capacity=64)
        loop.replies.native_plain = native_plain
        messages = {slot: [] for slot in range(N_SLOTS)}

        def read_rings():
            for slot in range(N_SLOTS):
                messages[slot].extend(decode_batch(m) for m in seg.response_ring(slot).get_all())

        steps = [*trace, *[((), ())] * 30]      # then run until everything has finished
        for arrivals, aborts in steps:
            for request_id, slot, prompt, params in arrivals:
                loop.table.admit(request_id, _Worker(slot, os.getpid()), prompt, params)
            for request_id in aborts:
                loop.table.abort(request_id)
            loop.replies.flush()
            if engine.has_work:
                loop.step()
            loop.replies.flush()
            read_rings()
        assert not engine.has_work and not loop.table.entries
        return messages
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.parametrize("seed", range(4))
def test_a_workers_records_are_the_same_with_the_native_path_on_and_off(model_path, seed, monkeypatch):
    trace = random_trace(seed)
    python = run_trace(model_path, trace, native_plain=False)
    published = []
    publish_plain = step_core.publish_plain
    monkeypatch.setattr(step_core, "publish_plain", lambda *a: published.append(len(a[0])) or publish_plain(*a))
    native = run_trace(model_path, trace, native_plain=True)
    assert native == python
    assert sum(published) > 0, "the native path never ran"
    records = [r for slot in python.values() for message in slot for r in message]
    assert any(isinstance(r, Tokens) and r.logprobs for r in records)      # the mix holds both kinds
    assert {r.finish_reason for r in records if isinstance(r, Finish)} >= {"stop", "length", "abort"}

