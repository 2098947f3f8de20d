"""The CUDA emulator (build_tools/cuda_emulator) on small kernels written here:
barriers, shuffles and shared memory behave as on a GPU, and what a GPU would
run wrongly (a shuffle with an exited lane, a deadlock, an argument of the
wrong type) fails the launch with a message instead."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
from emulated_cupy import require_emulator

from build_tools import cuda_emulator

SOURCE = r'''
#include <cuda_fp16.h>

/* out[b] = sum of x[b * blockDim.x ...], through shared memory and barriers. */
extern "C" __global__ void block_sum(const float *x, float *out) {
    __shared__ float buf[1024];
    buf[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) buf[threadIdx.x] += buf[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

/* out[t] = x[t ^ 5], x[t + 3] (or own), x[7] of the thread's warp: three shuffle kinds. */
extern "C" __global__ void shuffles(const int *x, int *out_xor, int *out_down, int *out_bcast) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x, v = x[t];
    out_xor[t] = __shfl_xor_sync(0xffffffffu, v, 5);
    out_down[t] = __shfl_down_sync(0xffffffffu, v, 3);
    out_bcast[t] = __shfl_sync(0xffffffffu, v, 7);
}

/* out[t] = base + (t + 1) % n, read from the neighbour's shared slot, with or without a barrier. */
extern "C" __global__ void neighbour(int *out, int base, int with_barrier) {
    __shared__ int buf[1024];
    const int t = threadIdx.x, n = blockDim.x;
    buf[t] = base + t;
    if (with_barrier) __syncthreads();
    out[t] = buf[(t + 1) % n];
}

/* Lanes of row >= n exit, the others shuffle with the whole warp. */
extern "C" __global__ void exit_then_shuffle(float *y, int n) {
    if ((int)threadIdx.x >= n) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

/* Thread 0 waits at a barrier, the rest at a shuffle that needs thread 0. */
extern "C" __global__ void deadlock(float *y) {
    float v = 1.0f;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

/* grid-stride: y[i] = half(x[i]) * s for i < n. */
extern "C" __global__ void scale_half(const __half *x, __half *y, long long n, float s) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(__half2float(x[i]) * s);
}
'''


@pytest.fixture(scope="module")
def mod():
    require_emulator()
    return cuda_emulator.RawModule(code=SOURCE)


def test_signatures_are_parsed():
    params = cuda_emulator.parse_kernels(SOURCE)["scale_half"]
    assert [(p.name, p.base, p.pointer) for p in params] == [
        ("x", "__half", True), ("y", "__half", True), ("n", "long long", False), ("s", "float", False)]


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_barriers_and_shared_memory(mod, threads):
    x = np.random.default_rng(threads).standard_normal(3 * threads).astype(np.float32)
    out = np.full(3, np.nan, np.float32)
    mod.get_function("block_sum")((3,), (threads,), (x, out))
    np.testing.assert_allclose(out, x.reshape(3, -1).astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_shuffles(mod):
    x = np.arange(128, dtype=np.int32) * 10
    outs = [np.full(128, -1, np.int32) for _ in range(3)]
    mod.get_function("shuffles")((2,), (64,), (x, *outs))
    t = np.arange(128)
    lane, base = t % 32, t - t % 32
    np.testing.assert_array_equal(outs[0], x[base + (lane ^ 5)])
    np.testing.assert_array_equal(outs[1], np.where(lane + 3 < 32, x[np.minimum(t + 3, 127)], x))
    np.testing.assert_array_equal(outs[2], x[base + 7])


def test_grid_stride_and_half_conversions(mod):
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float16)
    y = np.full(5000, np.nan, np.float16)
    mod.get_function("scale_half")((3,), (128,), (x, y, np.int64(5000), np.float32(3.0)))
    np.testing.assert_array_equal(y, (x.astype(np.float32) * np.float32(3.0)).astype(np.float16))


def test_a_missing_barrier_shows(mod):
    """Threads run in a shuffled order, so reading a neighbour's write before a barrier goes wrong."""
    neighbour, t = mod.get_function("neighbour"), np.arange(256)
    out = np.full(256, -1, np.int32)
    neighbour((1,), (256,), (out, np.int32(1000), np.int32(1)))
    np.testing.assert_array_equal(out, 1000 + (t + 1) % 256)
    neighbour((1,), (256,), (out, np.int32(0), np.int32(0)))    # stale slots still hold 1000 + t
    assert (out != (t + 1) % 256).sum() > 32


def test_whole_warps_exiting_is_fine(mod):
    y = np.zeros(64, np.float32)
    mod.get_function("exit_then_shuffle")((1,), (64,), (y, np.int32(32)))
    assert (y[:32] == 1).all() and (y[32:] == 0).all()


def test_shuffle_with_an_exited_lane_fails(mod):
    with pytest.raises(cuda_emulator.EmulatorError, match="exit"):
        mod.get_function("exit_then_shuffle")((1,), (32,), (np.zeros(32, np.float32), np.int32(20)))


def test_shuffle_past_the_end_of_a_partial_warp_fails(mod):
    with pytest.raises(cuda_emulator.EmulatorError, match="does not exist"):
        mod.get_function("exit_then_shuffle")((1,), (48,), (np.zeros(48, np.float32), np.int32(48)))


def test_deadlock_fails(mod):
    with pytest.raises(cuda_emulator.EmulatorError, match="deadlock"):
        mod.get_function("deadlock")((1,), (32,), (np.zeros(32, np.float32),))


def test_the_emulator_is_usable_after_a_failed_launch(mod):
    with pytest.raises(cuda_emulator.EmulatorError):
        mod.get_function("deadlock")((1,), (32,), (np.zeros(32, np.float32),))
    test_barriers_and_shared_memory(mod, 256)


@pytest.mark.parametrize("args, message", [
    ((np.zeros(4, np.float16), np.zeros(4, np.float16), np.int32(4), np.float32(1)), "want numpy int64"),
    ((np.zeros(4, np.float16), np.zeros(4, np.float16), 4, np.float32(1)), "want numpy int64, got int"),
    ((np.zeros(4, np.float32), np.zeros(4, np.float16), np.int64(4), np.float32(1)), "array of float32"),
    ((np.zeros(8, np.float16)[::2], np.zeros(4, np.float16), np.int64(4), np.float32(1)), "not C-contiguous"),
    ((np.zeros(4, np.float16), np.zeros(4, np.float16), np.int64(4)), "takes 4 arguments"),
])
def test_arguments_are_checked_against_the_parameters(mod, args, message):
    with pytest.raises(cuda_emulator.EmulatorError, match=message):
        mod.get_function("scale_half")((1,), (32,), args)


def test_bad_launches_and_sources_fail_clearly(mod):
    for grid, block in (((1,), (2048,)), ((1, 65536), (32,)), ((1, 0), (32,))):   # past CUDA's launch limits
        with pytest.raises(cuda_emulator.EmulatorError, match="bad launch"):
            mod.get_function("deadlock")(grid, block, (np.zeros(2048, np.float32),))
    with pytest.raises(cuda_emulator.EmulatorError, match="no extern"):
        mod.get_function("missing")
    with pytest.raises(cuda_emulator.EmulatorError, match="rejected"):
        cuda_emulator.RawModule(code='extern "C" __global__ void broken(float *y) { y[0] = undeclared; }')


def test_an_unwritable_cache_falls_back_to_tmp(monkeypatch):
    monkeypatch.setenv("PYFORGE_CUDA_EMULATOR_CACHE", "/proc/pyforge-cannot-be-made")   # mkdir fails, even as root
    assert cuda_emulator._cache_dir().parent == Path(tempfile.gettempdir())
