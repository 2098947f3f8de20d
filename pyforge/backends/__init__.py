"""Compute backends: each implements the primitives the model definitions use.

`cpu` (native C kernels, always available) and `cuda` (CuPy, optional). Nothing
CUDA is imported unless the cuda backend is asked for, or `auto` looks for it.
"""
import os
import re

CUDA_INSTALL_HINT = "pip install 'pyforge[cuda12]' or 'pyforge[cuda13]', matching the CUDA driver"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def cuda_status():
    """(True, "") when CuPy imports and sees a CUDA device, else (False, the reason)."""
    try:
        import cupy
    except ImportError as e:
        return False, f"CuPy is not installed ({e}); {CUDA_INSTALL_HINT}"
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError and friends: no driver, a broken one, no CUDA libraries
        return False, f"CuPy cannot use CUDA here: {e}"
    if n_devices == 0:
        return False, "CuPy found no CUDA device"
    return True, ""


def resolve_device(device, head_dim=None):
    """`auto` -> `cuda` when CuPy sees a device and its kernels fit the model's
    head_dim (when given), else `cpu`; other names unchanged."""
    if device != "auto":
        return device
    if head_dim is not None:
        from pyforge.backends.cuda_kernels import head_dim_problem

        if head_dim_problem(head_dim):
            return "cpu"
    return "cuda" if cuda_status()[0] else "cpu"


def get_backend(device="cpu", n_threads=None, gpu_memory_utilization=0.9, head_dim=None, cuda_graphs=False,
                kv_cache_dtype="auto", weight_type=None):
    """The backend for a device name: cpu, cuda, cuda:N or auto (head_dim: the model's, for auto);
    cuda_graphs asks for the stream that graph capture needs (ignored on cpu); kv_cache_dtype:
    backends/kv_dtype.py, whose auto follows the model's weight_type on the CPU."""
    device = resolve_device(device, head_dim)
    if device == "cpu":
        from pyforge.backends.cpu import CpuBackend

        return CpuBackend(n_threads=n_threads, kv_cache_dtype=kv_cache_dtype, weight_type=weight_type)
    match = _CUDA.fullmatch(device)
    if match is None:
        raise ValueError(f"unknown device {device!r} (choose auto, cpu, cuda or cuda:N)")
    ok, why = cuda_status()
    if not ok:
        raise ValueError(f"device {device!r} is not available: {why}")
    from pyforge.backends.cuda import CudaBackend

    return CudaBackend(int(match.group(1) or 0), n_threads=n_threads, gpu_memory_utilization=gpu_memory_utilization,
                       stream=cuda_graphs, kv_cache_dtype=kv_cache_dtype)


def default_threads():
    """Physical cores: OpenMP threads that share a core's FMA units only fight."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1
