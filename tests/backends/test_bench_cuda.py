"""benchmarks/bench_cuda.py on a tiny shape over the numpy CuPy stand-in: the
benchmark's own code (random device weights, paged batches, the report) runs
here, so the one run it gets on a GPU does not die of a typo."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from emulated_cupy import make_emulated_cupy

from pyforge.engine.model_runner import KVCache
from pyforge.models.config import ModelConfig

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cuda.py"
TINY = ModelConfig(arch="llama", vocab_size=512, hidden_size=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                   ffn_size=512, rms_eps=1e-5, rope_theta=10000.0, n_rot=64, rope_neox=False).validate()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_backend(bench):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", make_emulated_cupy())
        return bench.RandomWeightBackend(stream=True)


@pytest.mark.parametrize("fmt", ["F16", "Q4_K"])
def test_bench_model_rows(bench, fmt, capsys):
    rows, w_bytes = bench.bench_model(fake_backend(bench), TINY, fmt, [1, 5, 9], 40, (2, 24), 1e12, 1e14,
                                      graphs=True)
    assert [(r["phase"], r["batch"], r["tokens"]) for r in rows] == [
        ("decode", 1, 1), ("decode", 5, 5), ("decode", 9, 9), ("decode graph", 1, 1), ("decode graph", 5, 5),
        ("prefill", 2, 48)]
    assert all(r["tok_s"] > 0 and r["bound_tok_s"] > 0 for r in rows)
    per_weight = 2 if fmt == "F16" else 144 / 256
    n_weights = 2 * (256 * 256 * 2 + 128 * 256 * 2 + 3 * 512 * 256) + 512 * 256
    assert w_bytes == n_weights * per_weight
    report = dict(device="fake", bandwidth_GBps=1e3, gemm_TFLOPs=100,
                  rows=[dict(model="tiny", format=fmt, weight_GB=w_bytes / 1e9, **r) for r in rows])
    bench.print_table(report)
    assert "| tiny | " + fmt + " | prefill | 2 | 48 |" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["F16", "Q4_K"])
def test_random_weights_give_finite_logits(bench, fmt):
    backend = fake_backend(bench)
    model = bench.build_model(backend, TINY, fmt)
    kv = KVCache(backend, TINY, 8, bench.BLOCK)
    batch = bench.paged_batch(TINY, [30, 1], [0, 40], np.random.default_rng(0))
    logits = model.forward(batch, kv)
    assert logits.shape == (2, 512) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_host_benchmark_counts_launches_and_replays():
    """benchmarks/bench_cuda_host.py: a decode step's launches over the null CuPy, eager and as a graph."""
    spec = importlib.util.spec_from_file_location("bench_cuda_host", BENCH.with_name("bench_cuda_host.py"))
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", host.null_cupy())
        r = host.measure(TINY, "F16", 2)
    # per layer: 2 add_rmsnorm (layer 0: rmsnorm), 7 matmuls, 2 rope, kv_store, 2 attention, silu;
    # + embed, the last residual add, the final norm, the head
    assert r["launches"] == TINY.n_layers * 15 + 4 and r["graph_launches"] == 1
    assert r["graph_ms"] > 0 and r["eager_ms"] > 0 and r["bound_ms"] > 0
