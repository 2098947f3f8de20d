"""CuPy on the CPU: numpy arrays for device arrays, and cuda/*.cu run by the
CUDA emulator (build_tools/cuda_emulator) for RawModule.

With it, pyforge.backends.cuda and the kernel tests run on a machine without
a GPU, and what runs is the kernels' own source: launch grids, indexing,
shuffles and barriers as written. `empty` buffers start as NaN (floats) or
-1, so anything a kernel or a short grid leaves unwritten shows; every
launch's arguments are checked against the kernel's C parameters. cuBLAS
(`dot`) is numpy with float32 accumulation. Not covered: races, memory
faults, speed (the tests under `device` run on a real GPU).

Stream capture is recorded, not run: while a stream captures, kernel
launches, `take` and `copyto` are appended to the graph and nothing executes
until Graph.launch replays them, so anything a captured step computes some
other way (on the host, at capture time) comes out stale on replay and fails
its test. As in CuPy, `dot` (cuBLAS) refuses to be captured, and so does
`asarray` (a host copy has no place in a replay).
"""
import contextlib
import os
import types

import numpy as np
import pytest

from build_tools import cuda_emulator


def require_emulator():
    """Skip without a C++ compiler, or fail where CI asks for every check (PYFORGE_REQUIRE_EMULATOR=1)."""
    if cuda_emulator.compiler() is None:
        if os.environ.get("PYFORGE_REQUIRE_EMULATOR") == "1":
            pytest.fail("the CUDA emulator needs a C++ compiler (PYFORGE_REQUIRE_EMULATOR=1)")
        pytest.skip("no C++ compiler for the CUDA emulator", allow_module_level=True)


def make_emulated_cupy(total_bytes=16 << 30, free_bytes=16 << 30, n_sm=4):
    require_emulator()
    cp = types.ModuleType("cupy")
    cp.float16, cp.float32, cp.uint32, cp.int32, cp.uint8 = np.float16, np.float32, np.uint32, np.int32, np.uint8
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype, copy=True)   # a device copy
    cp.asnumpy = lambda a: np.array(a, copy=True)
    cp.empty = _poisoned_empty
    cp.full = lambda shape, value, dtype=float: np.full(shape, value, dtype)
    cp.zeros = lambda shape, dtype=float: np.zeros(shape, dtype)
    cp.ones = lambda shape, dtype=float: np.ones(shape, dtype)
    rng = np.random.default_rng(0)
    cp.random = types.SimpleNamespace(
        standard_normal=lambda size, dtype=np.float64: rng.standard_normal(size).astype(dtype),
        randint=lambda low, high, size, dtype=np.int64: rng.integers(low, high, size).astype(dtype))
    cp.take = _take
    cp.copyto = _recorded(np.copyto)
    cp.dot = _dot
    cp.asarray = _no_capture("asarray", cp.asarray)
    cp.RawModule = RawModule
    pool = types.SimpleNamespace(free_bytes=lambda: 0, blocks_freed=0)   # an empty pool; counts free_all_blocks
    pool.free_all_blocks = lambda: setattr(pool, "blocks_freed", pool.blocks_freed + 1)
    cp.get_default_memory_pool = lambda: pool
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (free_bytes, total_bytes))
    device = types.SimpleNamespace(use=lambda: None, attributes={"MultiProcessorCount": n_sm})
    memory = types.SimpleNamespace(OutOfMemoryError=type("OutOfMemoryError", (MemoryError,), {}))
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda index=0: device, memory=memory, Stream=Stream,
                                    MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                    using_allocator=lambda allocator=None: contextlib.nullcontext())
    return cp


# -- stream capture ---------------------------------------------------------------
_capturing = []     # the graph being recorded, if a stream is capturing


class Stream:
    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking

    def use(self):
        return self

    def begin_capture(self):
        assert not _capturing, "one capture at a time"
        _capturing.append(Graph())

    def end_capture(self):
        return _capturing.pop()


class Graph:
    def __init__(self):
        self.calls = []

    def launch(self, stream=None):
        for call in self.calls:
            call()


def _run_or_record(call):
    if _capturing:
        _capturing[-1].calls.append(call)
    else:
        call()


def _recorded(fn):
    def wrapper(*args, **kwargs):
        _run_or_record(lambda: fn(*args, **kwargs))
    return wrapper


def _no_capture(name, fn):
    def wrapper(*args, **kwargs):
        if _capturing:
            raise RuntimeError(f"cupy.{name} while a stream captures: a replay would not repeat it")
        return fn(*args, **kwargs)
    return wrapper


def _take(a, indices, axis=None, out=None):
    if out is None:
        assert axis == 0
        out = _poisoned_empty((*np.shape(indices), *a.shape[1:]), a.dtype)
    _run_or_record(lambda: np.take(a, indices, axis=axis, out=out))
    return out


def _poisoned_empty(shape, dtype=float):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.full(shape, np.nan, dtype)
    return np.full(shape, -1 if dtype.kind == "i" else np.iinfo(dtype).max, dtype)


def _dot(a, b, out=None):
    """cuBLAS fp16 GEMM: float32 accumulation, result rounded to the output type."""
    if _capturing:
        raise NotImplementedError("cuBLAS calls cannot be captured (as in CuPy)")
    result = (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
    if out is None:
        return result
    assert out.flags.c_contiguous and out.dtype == result.dtype and out.shape == result.shape
    out[...] = result
    return out


class RawModule(cuda_emulator.RawModule):
    def __init__(self, code, options=()):
        # CuPy's disk cache keys on the code text alone, so common.cuh must be pasted in
        assert '#include "common.cuh"' not in code, "common.cuh must be pasted in (CuPy caches by the code text)"
        super().__init__(code, options)

    def get_function(self, name):
        function = super().get_function(name)
        return lambda grid, block, args: _run_or_record(lambda: function(grid, block, args))
