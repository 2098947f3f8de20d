"""InProcessEngineClient: the engine loop on a thread of this process."""
import pytest

from conftest import drain_stream, fail_next_run
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server.engine_client import ErrorEvent, FinishEvent
from pyforge.server.inprocess import InProcessEngineClient
from pyforge.synthetic import write_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 450, 4996, 17354], [1, 3118, 29871, 42, 7], [1, 910, 338, 263, 1243, 29889]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(write_gguf("tiny-gqa", tmp_path_factory.mktemp("model") / "tiny-gqa.gguf", "F32"))


@pytest.mark.parametrize("error, status", [(MemoryError("injected"), 503), (RuntimeError("injected"), 500)])
def test_a_failed_step_fails_only_its_requests(model_path, error, status):
    engine = Engine(model_path, n_threads=2, max_model_len=128, kv_cache_tokens=512, max_num_seqs=2)
    expected = [out.token_id for out in engine.generate(PROMPTS[2], GREEDY)]
    client = InProcessEngineClient(engine)
    try:
        fail_next_run(engine, error)
        with client._cond:      # held: the loop admits all three at once, and steps the first two
            streams = [client.submit(p, GREEDY) for p in PROMPTS]
        results = [drain_stream(s) for s in streams]
    finally:
        client.close()
    for tokens, last in results[:2]:
        assert tokens == [] and isinstance(last, ErrorEvent) and last.status == status
    assert ("out of memory" if status == 503 else "internal error") in results[0][1].message
    assert results[2] == (expected, FinishEvent("length", len(PROMPTS[2]), 8, results[2][1].cached_tokens))
    assert engine.block_manager.num_free == engine.block_manager.n_blocks
