"""LlamaModel.activation_bytes, GemmaModel's too (what the CUDA backend keeps free of the KV cache for a
step) against the memory a forward pass really holds, measured with tracemalloc on the
CPU backend: the model code allocates the same buffers on both backends (float32 here),
and tracemalloc sees every numpy allocation. The estimate must bound the peak without
being loose enough to starve the KV cache."""
import tracemalloc

import numpy as np
import pytest

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import write_gguf

# Prompt lengths of one step: one long prefill, two, several short ones (their logits rows dominate).
BATCHES = [(300,), (100, 200), (5, 7, 9, 11)]
LAYERS_DOMINATE = {(300,), (100, 200)}    # the peak is inside the layers, not at the logits

@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mha", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3"])
def engine(request, tmp_path_factory):
    path = write_gguf(request.param, tmp_path_factory.mktemp("mem") / "model.gguf", "F32", seed=1)
    return Engine(str(path), n_threads=2, max_model_len=512, kv_cache_tokens=2048, max_num_batched_tokens=512)


def measured_peak(engine, lengths):
    """(tokens, logits rows, peak bytes traced) of one step prefilling prompts of these lengths."""
    rng = np.random.default_rng(0)
    for n in lengths:
        engine.add_request(rng.integers(3, engine.config.vocab_size, n).tolist(), SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule()
    tracemalloc.start()
    try:
        engine.runner.run(plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        for seq, _ in plan:
            engine.abort(seq.seq_id)
    return sum(n for _, n in plan), len(plan), peak


@pytest.mark.parametrize("lengths", BATCHES, ids=str)
def test_estimate_bounds_the_peak(engine, lengths):
    n_tokens, n_rows, peak = measured_peak(engine, lengths)
    assert n_tokens == sum(lengths)
    estimate = engine.model.activation_bytes(n_tokens, n_rows)
    assert peak <= estimate <= 2.5 * peak, (peak, estimate)
    if lengths in LAYERS_DOMINATE:      # the layers' part alone is the peak, to within small arrays
        layers = engine.model.activation_bytes(n_tokens, 0)
        assert 0.9 * peak <= layers <= 1.1 * peak, (peak, layers)
