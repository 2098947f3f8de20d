"""Compute backends: each implements the primitives the model definitions use.

`cpu` (native C kernels, always available) and `cuda` (CuPy, optional). Nothing
CUDA is imported unless the cuda backend is asked for.
"""


def get_backend(device="cpu", **options):
    if device == "cpu":
        from pyforge.backends.cpu import CpuBackend

        return CpuBackend(**options)
    raise ValueError(f"unknown device {device!r} (this build supports: cpu)")
