"""Host time of a CUDA decode step: what pyforge's Python costs per step, with every device call a no-op.

    python benchmarks/bench_cuda_host.py [--shapes 1B 8B] [--batches 1 8]

The CUDA backend runs here over a CuPy stand-in whose kernels, cuBLAS calls and
copies do nothing (weights are never-touched numpy buffers of full size), so
the time per `model.forward` is the host's own share of a decode step: the
model code, launch-argument checks and conversions, batch packing. CuPy's own
cost per launch (driver calls, argument packing in Cython) comes on top and is
not in it. Beside it: the launches per step, the same step as a CUDA-graph
replay (`--cuda-graphs`: the metadata write and one graph launch), and the
device's lower bound for the step, weight bytes / bandwidth at H100 SXM's
3.35 TB/s. Where the host time passes that bound, an eager step cannot keep
the GPU busy, and graphs (or fewer launches) are what pays.
"""
import argparse
import contextlib
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cuda import BLOCK, FORMATS, SHAPES, build_model, matmul_weights, paged_batch  # noqa: E402
from torch_llama import step_seconds  # noqa: E402

from pyforge.backends.cuda import CudaBackend, DeviceWeight  # noqa: E402
from pyforge.engine.model_runner import KVCache  # noqa: E402
from pyforge.ggml_types import GGMLType, row_bytes  # noqa: E402

H100_BYTES_PER_S = 3.35e12
CONTEXT = 512


class Counter:
    launches = 0


def null_cupy():
    """A CuPy whose device work is skipped: arrays are numpy, kernels count themselves and return."""
    cp = types.ModuleType("cupy")
    for name in ("float16", "float32", "int32", "uint8", "uint32"):
        setattr(cp, name, getattr(np, name))
    cp.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype)
    cp.asnumpy = np.asarray
    cp.empty = lambda shape, dtype=float: np.empty(shape, dtype)
    cp.zeros = lambda shape, dtype=float: np.empty(shape, dtype)   # contents never read
    cp.ones = lambda shape, dtype=float: np.ones(shape, dtype)
    cp.copyto = lambda dst, src: None

    def launch(*args, **kwargs):
        Counter.launches += 1
        return kwargs.get("out")
    cp.take = launch
    cp.dot = launch
    module = types.SimpleNamespace(get_function=lambda name: launch)
    cp.RawModule = lambda code, options=(): module
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_bytes=lambda: 0)
    graph = types.SimpleNamespace(launch=launch)
    stream = types.SimpleNamespace(use=lambda: None, begin_capture=lambda: None, end_capture=lambda: graph)
    cp.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (80 << 30, 80 << 30)),
        Device=lambda index=0: types.SimpleNamespace(use=lambda: None, attributes={"MultiProcessorCount": 132}),
        Stream=lambda non_blocking=False: stream, MemoryPool=lambda: types.SimpleNamespace(malloc=None),
        using_allocator=lambda allocator=None: contextlib.nullcontext())
    return cp


class UntouchedWeightBackend(CudaBackend):
    """Weights of the right size and type, never written or read (np.empty: no pages are touched)."""

    def upload(self, tensor):
        t = GGMLType(tensor.ggml_type)
        n_out, n_in = tensor.shape
        data = np.empty(tensor.shape, np.float16) if t == GGMLType.F16 else np.empty((n_out, row_bytes(t, n_in)),
                                                                                      np.uint8)
        return DeviceWeight(t, tuple(tensor.shape), data)

    def prepare_vector(self, tensor):
        return np.ones(tensor.shape, np.float32)

    def to_host(self, x):
        return x        # on a GPU: one cast kernel and a copy; not Python work


def measure(cfg, fmt, batch_size):
    """{launches, graph_launches, eager_ms, graph_ms, bound_ms} of one decode step (cupy: null_cupy())."""
    backend = UntouchedWeightBackend(stream=True)
    model = build_model(backend, cfg, fmt)
    kv = KVCache(backend, cfg, batch_size * -(-(CONTEXT + 1) // BLOCK), BLOCK)
    batch = paged_batch(cfg, [1] * batch_size, [CONTEXT] * batch_size, np.random.default_rng(0))
    forward = lambda: model.forward(batch, kv)  # noqa: E731
    Counter.launches = 0
    forward()
    launches = Counter.launches
    eager = step_seconds(forward, budget_s=2.0)
    backend.use_cuda_graphs(CONTEXT + 1, BLOCK)
    forward()                       # the capture
    Counter.launches = 0
    forward()
    graph_launches = Counter.launches
    graph = step_seconds(forward, budget_s=1.0)
    w_bytes, _ = matmul_weights(model)
    return dict(launches=launches, graph_launches=graph_launches, eager_ms=eager * 1e3, graph_ms=graph * 1e3,
                bound_ms=w_bytes / H100_BYTES_PER_S * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args(argv)
    sys.modules["cupy"] = null_cupy()
    print("| model | fmt | batch | launches/step | host ms/step, eager | host ms/step, graph | H100 bound ms |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for fmt in args.formats:
            for b in args.batches:
                r = measure(SHAPES[shape], fmt, b)
                print(f"| {shape} | {fmt} | {b} | {r['launches']} | {r['eager_ms']:.2f} | {r['graph_ms']:.3f} | "
                      f"{r['bound_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
